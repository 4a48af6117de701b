//! `attestctl simulate`: a fleet of virtual hosts for load testing the
//! attestation server (issue 8). Each virtual host has its own software EK
//! and AK (NIST P-256) and its own agent certificate from the pool's CA, and
//! goes through the real protocol: enroll with an EK certificate, activate
//! the credential, then challenge, quote, evidence, so that every server
//! check runs. The quotes are TPMS_ATTEST and TPMT_SIGNATURE marshalled as a
//! TPM would. For load only: real agents keep using a real TPM.

pub mod fleet;
pub mod http;
pub mod quote;

use crate::credential::{self, Credential};
use base64::Engine;
use fleet::Issuer;
use http::{Conn, Target};
use proto::client::ApiClient;
use proto::tpm::Public;
use proto::wire::{ActivateRequest, Challenge, EnrollRequest, EnrollResponse};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Printed on stderr when the measured window opens after a warm-up;
/// bench/load.sh matches it (a test keeps the two equal).
pub const WINDOW_OPEN_LINE: &str = "simulate: warm-up over, measuring";

/// One attestation (connect, challenge, possibly enrollment, evidence) gives up after this.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// A pool written by `attestctl init` (its CA issues the hosts' certificates;
    /// the fleet's keys and EK CA live in DIR/sim/).
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of virtual hosts.
    #[arg(long)]
    pub hosts: usize,
    /// Seconds between two attestations of a host.
    #[arg(long, default_value_t = 30.0)]
    pub interval: f64,
    /// Seconds to run (ignored with --enroll-only).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds over which the hosts' first attestations are spread (default: --interval).
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Seconds of attestation on schedule before the measured --duration,
    /// left out of the summary. When every host attests at least once in
    /// it, the window shows a fleet that has been running (hosts holding
    /// TLS session tickets), not one whose every host connects first.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Share of hosts (0-1) whose PCR 7 differs from their whitelist.
    #[arg(long, default_value_t = 0.0)]
    pub tampered: f64,
    /// Share of hosts (0-1) that send malformed evidence.
    #[arg(long, default_value_t = 0.0)]
    pub garbage: f64,
    /// Seconds between two garbage submissions of a garbage host; 0 = back
    /// to back, as fast as the server answers (default: --interval).
    #[arg(long)]
    pub garbage_interval: Option<f64>,
    /// Most attestations in flight at once (each on its own TLS connection).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Enroll every host (and set its whitelist, then attest once), then stop.
    #[arg(long)]
    pub enroll_only: bool,
    /// Write DIR/sim (fleet seed, EK CA) and print the EK CA path, then stop.
    #[arg(long)]
    pub prepare_only: bool,
    /// Full TLS handshake every time (no session resumption).
    #[arg(long)]
    pub no_resumption: bool,
    /// The server (default: server_url of DIR/admin.toml).
    #[arg(long)]
    pub server_url: Option<String>,
    /// Host names are PREFIX-NNNNNN.
    #[arg(long, default_value = "sim")]
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid {key}: {problem}")]
    Config { key: String, problem: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("fleet state {path}: {detail}")]
    State { path: String, detail: String },
    #[error("certificates: {0}")]
    Pki(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("{code}: {detail}")]
    Transport { code: &'static str, detail: String },
    #[error("server answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer to {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("credential activation: {0}")]
    Credential(#[from] credential::CredentialError),
    #[error("admin API: {0}")]
    Admin(#[from] proto::client::ClientError),
    #[error(
        "the server does not trust the simulator's EK CA ({message}); add {ca} to ek_ca in \
         the server's config (or ATTEST_SERVER_EK_CA) and restart it"
    )]
    EkCaRefused { ca: String, message: String },
    #[error("attestation timed out after {0:?}")]
    Timeout(Duration),
}

impl SimError {
    /// The key errors are counted under in the summary.
    fn code(&self) -> String {
        match self {
            SimError::Api { code, .. } => code.clone(),
            SimError::Transport { code, .. } => (*code).to_string(),
            SimError::Timeout(_) => "timeout".into(),
            SimError::Decode { .. } => "bad_answer".into(),
            SimError::Credential(_) => "activation_failed".into(),
            SimError::Admin(e) => format!("admin_{}", e.code().unwrap_or("transport")),
            SimError::EkCaRefused { .. } => "ek_certificate_unknown_issuer".into(),
            _ => "local".into(),
        }
    }
}

impl From<SimError> for crate::ctl::CtlError {
    fn from(e: SimError) -> Self {
        match e {
            SimError::Config { key, problem } => {
                crate::ctl::CtlError::Local(crate::error::Error::Config { key, problem })
            }
            other => crate::ctl::CtlError::Input {
                path: "attestctl simulate".into(),
                detail: other.to_string(),
            },
        }
    }
}

/// What a virtual host does wrong, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Honest,
    Tampered,
    Garbage,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Honest => "honest",
            Kind::Tampered => "tampered",
            Kind::Garbage => "garbage",
        }
    }
}

/// Spread `share` of the hosts evenly over the index range; `phase` shifts
/// the picks so that two shares rarely pick the same host.
fn picked(i: usize, share: f64, phase: f64) -> bool {
    let f = share.clamp(0.0, 1.0);
    ((i + 1) as f64 * f + phase).floor() > (i as f64 * f + phase).floor()
}

/// Host `i`'s kind: garbage and tampered shares are interleaved through the
/// fleet (a host picked by both is garbage).
pub fn kind_of(i: usize, tampered: f64, garbage: f64) -> Kind {
    if picked(i, garbage, 0.0) {
        Kind::Garbage
    } else if picked(i, tampered, 0.5) {
        Kind::Tampered
    } else {
        Kind::Honest
    }
}

pub fn host_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:06}")
}

/// One virtual host, ready to attest.
pub struct VirtualHost {
    pub index: usize,
    pub name: String,
    pub kind: Kind,
    tls: Arc<rustls::ClientConfig>,
    ak_public: Public,
    ak_name: Vec<u8>,
    ak: ring::signature::EcdsaKeyPair,
    busy: AtomicBool,
}

/// Everything the attestation tasks share.
struct Fleet {
    hosts: Vec<VirtualHost>,
    seed: Vec<u8>,
    target: Target,
    admin: ApiClient,
    ek_issuer: Issuer,
    ek_ca_path: PathBuf,
    stats: Mutex<Vec<Sample>>,
    enrollments: AtomicU64,
    enroll_retries: AtomicU64,
    whitelists: AtomicU64,
}

#[derive(Debug, Clone)]
enum Outcome {
    Verdict {
        trusted: bool,
        /// The first reason's code and PCR index, for untrusted verdicts.
        code: Option<String>,
        pcr: Option<u64>,
    },
    Error(String),
}

#[derive(Debug, Clone)]
struct Sample {
    kind: Kind,
    finished: Instant,
    total_us: u64,
    evidence_us: u64,
    connect_us: u64,
    resumed: bool,
    outcome: Outcome,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn latency(mut us: Vec<u64>) -> Latency {
    if us.is_empty() {
        return Latency::default();
    }
    us.sort_unstable();
    let at = |p: f64| {
        let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
        us.get(rank - 1).copied().unwrap_or_default() as f64 / 1000.0
    };
    Latency {
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// Per kind of host.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct KindSummary {
    pub hosts: usize,
    pub attempts: u64,
    pub trusted: u64,
    pub untrusted: u64,
    pub errors: u64,
    /// Verdicts other than the kind's expected one (honest: trusted;
    /// tampered: untrusted with a PCR fault; garbage: refused).
    pub unexpected: u64,
    pub latency: Latency,
}

/// The JSON summary `attestctl simulate` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub mode: &'static str,
    pub server_url: String,
    pub hosts: usize,
    pub interval_secs: f64,
    /// Attestation before the measured window, not counted.
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub concurrency: usize,
    pub tls_resumption: bool,
    /// Verdicts (trusted or untrusted) answered within the run, per second.
    pub attestations_per_second: f64,
    pub attestations: u64,
    pub trusted: u64,
    pub untrusted: u64,
    /// The rate the schedule asked for (hosts / interval, garbage floods excluded).
    pub target_per_second: f64,
    /// End to end for honest and tampered hosts: TCP connect, TLS,
    /// challenge, quote, evidence, verdict.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub latency: Latency,
    /// The evidence request alone (verification and durable verdict).
    pub evidence_latency: Latency,
    /// TCP connect and TLS handshake.
    pub connect_latency: Latency,
    pub tls_resumed: u64,
    pub tls_full: u64,
    /// Error answers (and local failures) by code.
    pub errors: BTreeMap<String, u64>,
    pub by_kind: BTreeMap<&'static str, KindSummary>,
    pub enrollments: u64,
    /// Enrollments retried after a 5xx answer (e.g. storage_unavailable).
    pub enroll_retries: u64,
    pub whitelists_set: u64,
    /// Attestations not started because the host's previous one was still running.
    pub skipped_busy: u64,
    /// How late the scheduler started attestations (all slots busy).
    pub schedule_lag: Latency,
    pub setup_secs: f64,
}

/// Run the simulator.
pub async fn run(args: &SimulateArgs) -> Result<Summary, SimError> {
    validate(args)?;
    let state = fleet::load_or_create(&args.dir, &args.prefix, args.hosts)?;
    let setup_started = Instant::now();
    let fleet = Arc::new(build_fleet(args, &state).await?);
    let setup_secs = setup_started.elapsed().as_secs_f64();
    let summary = if args.enroll_only {
        enroll_all(args, fleet.clone()).await?
    } else {
        attest_loop(args, fleet.clone()).await?
    };
    Ok(Summary {
        setup_secs,
        ..summary
    })
}

/// What `attestctl simulate` prints: the summary, or with `--prepare-only`
/// where the EK CA is.
pub async fn run_json(args: &SimulateArgs) -> Result<serde_json::Value, SimError> {
    if args.prepare_only {
        return prepare(args);
    }
    let summary = run(args).await?;
    serde_json::to_value(summary).map_err(|e| SimError::Decode {
        what: "summary",
        detail: e.to_string(),
    })
}

/// `--prepare-only`: create DIR/sim and return the EK CA to configure.
pub fn prepare(args: &SimulateArgs) -> Result<serde_json::Value, SimError> {
    validate(args)?;
    let state = fleet::load_or_create(&args.dir, &args.prefix, args.hosts)?;
    Ok(serde_json::json!({
        "ek_ca": fleet::ek_ca_path(&args.dir),
        "fleet": fleet::sim_dir(&args.dir).join("fleet.json"),
        "prefix": state.prefix,
        "hosts": args.hosts,
    }))
}

fn validate(args: &SimulateArgs) -> Result<(), SimError> {
    let bad = |key: &str, problem: &str| {
        Err(SimError::Config {
            key: key.into(),
            problem: problem.into(),
        })
    };
    if args.hosts == 0 || args.hosts > 1_000_000 {
        return bad("--hosts", "must be 1 to 1,000,000");
    }
    if !(args.interval.is_finite() && args.interval > 0.0) {
        return bad("--interval", "must be a positive number of seconds");
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return bad("--duration", "must be a positive number of seconds");
    }
    if args.ramp.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
        return bad("--ramp", "must be zero or more seconds");
    }
    if !(args.warmup.is_finite() && args.warmup >= 0.0) {
        return bad("--warmup", "must be zero or more seconds");
    }
    if args
        .garbage_interval
        .is_some_and(|r| !(r.is_finite() && r >= 0.0))
    {
        return bad("--garbage-interval", "must be zero or more seconds");
    }
    for (key, v) in [("--tampered", args.tampered), ("--garbage", args.garbage)] {
        if !(0.0..=1.0).contains(&v) {
            return bad(key, "must be a share between 0 and 1");
        }
    }
    if args.concurrency == 0 || args.concurrency > 100_000 {
        return bad("--concurrency", "must be 1 to 100,000");
    }
    if !proto::wire::valid_host_name(&host_name(&args.prefix, 0)) {
        return bad("--prefix", "must make valid host names");
    }
    Ok(())
}

async fn build_fleet(args: &SimulateArgs, state: &fleet::FleetState) -> Result<Fleet, SimError> {
    let admin_cfg = crate::ctl::CtlConfig::load(&args.dir.join("admin.toml")).map_err(|e| {
        SimError::Config {
            key: "--dir".into(),
            problem: format!("no usable admin.toml: {e}"),
        }
    })?;
    let url = args
        .server_url
        .clone()
        .unwrap_or_else(|| admin_cfg.server_url.clone());
    let target = Target::parse(&url)?;
    let admin = ApiClient::new(&url, &admin_cfg.tls, Duration::from_secs(30))?;
    let seed = hex::decode(&state.seed).map_err(|e| SimError::State {
        path: "sim/fleet.json".into(),
        detail: e.to_string(),
    })?;
    let ca = Arc::new(Issuer::load(
        &args.dir.join("ca.pem"),
        &args.dir.join("ca.key"),
    )?);
    let ek_ca_path = fleet::ek_ca_path(&args.dir);
    let ek_issuer = Issuer::load(&ek_ca_path, &fleet::sim_dir(&args.dir).join("ek-ca.key"))?;
    let roots = Arc::new(root_store(&args.dir.join("ca.pem"))?);

    // Certificates and keys for every host: CPU-bound, on every core.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n = args.hosts;
    let chunk = n.div_ceil(threads);
    let mut handles = Vec::new();
    for t in 0..threads {
        let (ca, roots, seed, prefix) =
            (ca.clone(), roots.clone(), seed.clone(), args.prefix.clone());
        let (tampered, garbage, resumption) = (args.tampered, args.garbage, !args.no_resumption);
        let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
        handles.push(tokio::task::spawn_blocking(move || {
            range
                .map(|i| {
                    virtual_host(
                        i, &prefix, &seed, &ca, &roots, resumption, tampered, garbage,
                    )
                })
                .collect::<Result<Vec<_>, SimError>>()
        }));
    }
    let mut hosts = Vec::with_capacity(n);
    for h in handles {
        let part = h.await.map_err(|e| SimError::Pki(e.to_string()))??;
        hosts.extend(part);
    }
    Ok(Fleet {
        hosts,
        seed,
        target,
        admin,
        ek_issuer,
        ek_ca_path,
        stats: Mutex::new(Vec::new()),
        enrollments: AtomicU64::new(0),
        enroll_retries: AtomicU64::new(0),
        whitelists: AtomicU64::new(0),
    })
}

fn root_store(ca: &std::path::Path) -> Result<rustls::RootCertStore, SimError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| SimError::Tls(e.to_string()))? {
        roots
            .add(c.map_err(|e| SimError::Tls(e.to_string()))?)
            .map_err(|e| SimError::Tls(e.to_string()))?;
    }
    Ok(roots)
}

/// A virtual host's TLS client: TLS 1.3, its own client certificate, and
/// a ticket cache of its own when `resumption` (also used by the
/// `tls_floor` bench, so that both make the same handshakes).
pub fn host_tls(
    roots: &Arc<rustls::RootCertStore>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    resumption: bool,
) -> Result<Arc<rustls::ClientConfig>, SimError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SimError::Tls(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| SimError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // One host talks to one server: a tiny per-host ticket cache (rustls'
    // default of 256 entries per config would cost gigabytes at 100k hosts).
    tls.resumption = if resumption {
        rustls::client::Resumption::in_memory_sessions(2)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(tls))
}

#[allow(clippy::too_many_arguments)]
fn virtual_host(
    index: usize,
    prefix: &str,
    seed: &[u8],
    ca: &Issuer,
    roots: &Arc<rustls::RootCertStore>,
    resumption: bool,
    tampered: f64,
    garbage: f64,
) -> Result<VirtualHost, SimError> {
    let name = host_name(prefix, index);
    let (cert, key) = ca.agent_cert(&name)?;
    let tls = host_tls(
        roots,
        CertificateDer::from(cert),
        PrivateKeyDer::Pkcs8(key.into()),
        resumption,
    )?;
    let (ak_public, ak) = fleet::ak(&fleet::derive_key(seed, "ak", index))?;
    Ok(VirtualHost {
        index,
        kind: kind_of(index, tampered, garbage),
        ak_name: ak_public.name(),
        name,
        tls,
        ak_public,
        ak,
        busy: AtomicBool::new(false),
    })
}

/// Enroll every host as fast as `--concurrency` allows; each then sets its
/// whitelist and attests once.
async fn enroll_all(args: &SimulateArgs, fleet: Arc<Fleet>) -> Result<Summary, SimError> {
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let abort = Arc::new(Mutex::new(None::<SimError>));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..fleet.hosts.len() {
        if abort.lock().map(|a| a.is_some()).unwrap_or(true) {
            break;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (fleet, abort) = (fleet.clone(), abort.clone());
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e @ SimError::EkCaRefused { .. }) =
                attest_once(&fleet, i, Instant::now(), true).await
            {
                if let Ok(mut a) = abort.lock() {
                    a.get_or_insert(e);
                }
            }
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    if let Some(e) = abort.lock().ok().and_then(|mut a| a.take()) {
        return Err(e);
    }
    Ok(summarize(
        args,
        &fleet,
        "enroll",
        started..Instant::now(),
        Vec::new(),
        0,
    ))
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Due(std::cmp::Reverse<(Instant, usize)>);

/// Attest on schedule for `--duration` seconds.
async fn attest_loop(args: &SimulateArgs, fleet: Arc<Fleet>) -> Result<Summary, SimError> {
    let interval = Duration::from_secs_f64(args.interval);
    let garbage_interval = args.garbage_interval.map(Duration::from_secs_f64);
    let ramp = Duration::from_secs_f64(args.ramp.unwrap_or(args.interval));
    let duration = Duration::from_secs_f64(args.duration);
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let start = Instant::now();
    // The measured window follows the warm-up.
    let from = start + Duration::from_secs_f64(args.warmup);
    let end = from + duration;
    if args.warmup > 0.0 {
        // A line on stderr when the window opens, for scripts that sample
        // the server's counters over the window only (bench/load.sh).
        tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            eprintln!("{WINDOW_OPEN_LINE}");
        });
    }
    let stop = Arc::new(AtomicBool::new(false));

    // Hosts on a schedule; garbage hosts with interval 0 flood instead.
    let flood = garbage_interval.is_some_and(|g| g.is_zero());
    let scheduled: Vec<usize> = fleet
        .hosts
        .iter()
        .filter(|h| !(flood && h.kind == Kind::Garbage))
        .map(|h| h.index)
        .collect();
    let mut heap = BinaryHeap::with_capacity(scheduled.len());
    let m = scheduled.len().max(1) as f64;
    for (j, i) in scheduled.iter().enumerate() {
        let offset = ramp.mul_f64(j as f64 / m);
        heap.push(Due(std::cmp::Reverse((start + offset, *i))));
    }
    let mut flooders = tokio::task::JoinSet::new();
    if flood {
        for h in fleet.hosts.iter().filter(|h| h.kind == Kind::Garbage) {
            let (fleet, stop, i) = (fleet.clone(), stop.clone(), h.index);
            flooders.spawn(async move {
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let _ = attest_once(&fleet, i, Instant::now(), false).await;
                }
            });
        }
    }

    let mut lag_us = Vec::new();
    let mut skipped = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut fatal = None;
    while let Some(Due(std::cmp::Reverse((due, i)))) = heap.pop() {
        // Past the end (or behind schedule past it): stop dispatching.
        if due >= end || Instant::now() >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= from {
            lag_us.push(now.saturating_duration_since(due).as_micros() as u64);
        }
        let Some(host) = fleet.hosts.get(i) else {
            continue;
        };
        let every = match host.kind {
            Kind::Garbage => garbage_interval.unwrap_or(interval),
            _ => interval,
        };
        heap.push(Due(std::cmp::Reverse((due + every, i))));
        if host.busy.swap(true, Ordering::AcqRel) {
            if now >= from {
                skipped += 1;
            }
            continue;
        }
        let fleet2 = fleet.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let r = attest_once(&fleet2, i, now, false).await;
            if let Some(h) = fleet2.hosts.get(i) {
                h.busy.store(false, Ordering::Release);
            }
            r
        });
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Err(e @ SimError::EkCaRefused { .. })) = done {
                fatal = Some(e);
            }
        }
        if fatal.is_some() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let wait = async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e @ SimError::EkCaRefused { .. })) = done {
                fatal = Some(e);
            }
        }
        while flooders.join_next().await.is_some() {}
    };
    let _ = tokio::time::timeout(ATTEST_TIMEOUT + Duration::from_secs(5), wait).await;
    if let Some(e) = fatal {
        return Err(e);
    }
    Ok(summarize(
        args,
        &fleet,
        "attest",
        from..end,
        lag_us,
        skipped,
    ))
}

/// One attestation of host `i`, recorded in the fleet's samples. With
/// `enroll` the host enrolls first whatever the server knows of it.
async fn attest_once(
    fleet: &Fleet,
    i: usize,
    started: Instant,
    enroll: bool,
) -> Result<(), SimError> {
    let Some(host) = fleet.hosts.get(i) else {
        return Ok(());
    };
    let mut timing = Timing::default();
    let result = tokio::time::timeout(ATTEST_TIMEOUT, attest(fleet, host, enroll, &mut timing))
        .await
        .unwrap_or(Err(SimError::Timeout(ATTEST_TIMEOUT)));
    let outcome = match &result {
        Ok(o) => o.clone(),
        // Evidence refusals by their code; failures before it by step too.
        Err(e) if timing.step == "evidence" => Outcome::Error(e.code()),
        Err(e) => Outcome::Error(format!("{}:{}", timing.step, e.code())),
    };
    let sample = Sample {
        kind: host.kind,
        finished: Instant::now(),
        total_us: started.elapsed().as_micros() as u64,
        evidence_us: timing.evidence_us,
        connect_us: timing.connect_us,
        resumed: timing.resumed,
        outcome,
    };
    if let Ok(mut s) = fleet.stats.lock() {
        s.push(sample);
    }
    result.map(|_| ())
}

#[derive(Default)]
struct Timing {
    /// The step in progress (connect, enroll, challenge, whitelist, evidence).
    step: &'static str,
    connect_us: u64,
    evidence_us: u64,
    resumed: bool,
}

async fn attest(
    fleet: &Fleet,
    host: &VirtualHost,
    enroll: bool,
    timing: &mut Timing,
) -> Result<Outcome, SimError> {
    timing.step = "connect";
    let t = Instant::now();
    let mut conn = Conn::connect(&fleet.target, host.tls.clone()).await?;
    timing.connect_us = t.elapsed().as_micros() as u64;
    timing.resumed = conn.resumed;
    let agent = format!("/v1/agents/{}", host.name);
    let mut enrolled_now = false;
    if enroll {
        timing.step = "enroll";
        enroll_host(fleet, host, &mut conn, &agent).await?;
        enrolled_now = true;
    }
    timing.step = "challenge";
    let challenge =
        match post::<Challenge>(&mut conn, &format!("{agent}/challenge"), b"{}", "challenge").await
        {
            Err(SimError::Api { code, .. })
                if !enrolled_now && (code == "ak_not_enrolled" || code == "ak_not_activated") =>
            {
                // A fleet this server has not seen (e.g. a fresh database): enroll, as an agent would.
                timing.step = "enroll";
                enroll_host(fleet, host, &mut conn, &agent).await?;
                enrolled_now = true;
                timing.step = "challenge";
                post::<Challenge>(&mut conn, &format!("{agent}/challenge"), b"{}", "challenge")
                    .await?
            }
            other => other?,
        };
    let selection = proto::wire::selection_from_map(&challenge.pcr_selection);
    if enrolled_now {
        timing.step = "whitelist";
        set_whitelist(
            &fleet.admin,
            &host.name,
            &quote::golden_whitelist(&selection),
        )
        .await?;
        fleet.whitelists.fetch_add(1, Ordering::Relaxed);
    }
    let evidence = match host.kind {
        Kind::Garbage => quote::garbage(&challenge.nonce, &selection),
        kind => quote::quote(
            &host.ak,
            &host.ak_name,
            &challenge.nonce,
            &selection,
            kind == Kind::Tampered,
        )?,
    };
    let body = serde_json::to_vec(&evidence).map_err(|e| SimError::Decode {
        what: "evidence",
        detail: e.to_string(),
    })?;
    timing.step = "evidence";
    let t = Instant::now();
    let verdict =
        post::<serde_json::Value>(&mut conn, &format!("{agent}/evidence"), &body, "evidence").await;
    timing.evidence_us = t.elapsed().as_micros() as u64;
    conn.close().await;
    let verdict = verdict?;
    let first = verdict["reasons"].get(0);
    Ok(Outcome::Verdict {
        trusted: verdict["trust"] == "trusted",
        code: first.and_then(|r| r["code"].as_str()).map(str::to_string),
        pcr: first.and_then(|r| r["pcr"]["index"].as_u64()),
    })
}

/// The whitelist set-up, in one place: the admin API's per-host whitelist
/// (`PUT /v1/hosts/{host}/whitelist`) with the fleet's golden values.
async fn set_whitelist(
    admin: &ApiClient,
    host: &str,
    pcrs: &proto::wire::PcrWhitelist,
) -> Result<(), SimError> {
    let body = serde_json::json!({ "pcrs": pcrs });
    admin
        .put::<_, serde_json::Value>(&format!("/v1/hosts/{host}/whitelist"), &body)
        .await?;
    Ok(())
}

/// Enroll, retrying transient refusals (5xx) as an agent's backoff would.
async fn enroll_host(
    fleet: &Fleet,
    host: &VirtualHost,
    conn: &mut Conn,
    agent: &str,
) -> Result<(), SimError> {
    let mut attempt = 0u32;
    loop {
        match enroll_once(fleet, host, conn, agent).await {
            Err(SimError::Api { status, .. }) if status >= 500 && attempt < 4 => {
                attempt += 1;
                fleet.enroll_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// enroll, recover the credential with the software EK, activate.
async fn enroll_once(
    fleet: &Fleet,
    host: &VirtualHost,
    conn: &mut Conn,
    agent: &str,
) -> Result<(), SimError> {
    let ek_key = fleet::derive_key(&fleet.seed, "ek", host.index);
    let (ek_public, ek_point) = fleet::ek_public(&ek_key)?;
    let ek_cert = fleet.ek_issuer.ek_cert(&host.name, &ek_point)?;
    let req = EnrollRequest {
        ek_certificate: Some(B64.encode(ek_cert)),
        ek_public: B64.encode(ek_public.encode()),
        ak_public: B64.encode(host.ak_public.encode()),
        ak_name: Some(hex::encode(&host.ak_name)),
    };
    let body = serde_json::to_vec(&req).map_err(|e| SimError::Decode {
        what: "enroll",
        detail: e.to_string(),
    })?;
    let offer =
        match post::<EnrollResponse>(conn, &format!("{agent}/enroll"), &body, "enroll").await {
            Err(SimError::Api { code, message, .. }) if code == "ek_certificate_unknown_issuer" => {
                return Err(SimError::EkCaRefused {
                    ca: fleet.ek_ca_path.display().to_string(),
                    message,
                })
            }
            other => other?,
        };
    let decode = |what: &'static str, s: &str| {
        B64.decode(s).map_err(|e| SimError::Decode {
            what,
            detail: e.to_string(),
        })
    };
    let credential = Credential {
        id_object: decode("credential_blob", &offer.credential_blob)?,
        encrypted_secret: decode("encrypted_secret", &offer.encrypted_secret)?,
    };
    let secret = credential::activate_ecc(&ek_public, &ek_key, &host.ak_name, &credential)?;
    let proof = {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new_from_slice(&secret)
            .map_err(|e| SimError::Pki(e.to_string()))?;
        mac.update(host.name.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    let body = serde_json::to_vec(&ActivateRequest {
        enrollment_id: offer.enrollment_id,
        proof,
    })
    .map_err(|e| SimError::Decode {
        what: "activate",
        detail: e.to_string(),
    })?;
    post::<serde_json::Value>(conn, &format!("{agent}/activate"), &body, "activate").await?;
    fleet.enrollments.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn post<T: serde::de::DeserializeOwned>(
    conn: &mut Conn,
    path: &str,
    body: &[u8],
    what: &'static str,
) -> Result<T, SimError> {
    let resp = conn.send("POST", path, body).await?;
    if (200..300).contains(&resp.status) {
        return serde_json::from_slice(&resp.body).map_err(|e| SimError::Decode {
            what,
            detail: e.to_string(),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    Err(SimError::Api {
        status: resp.status,
        code: v["error"]["code"]
            .as_str()
            .unwrap_or("http_error")
            .to_string(),
        message: v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

/// The summary of the samples that finished in `window` (after a warm-up;
/// verdicts after its end are not counted as attestations of the run).
fn summarize(
    args: &SimulateArgs,
    fleet: &Fleet,
    mode: &'static str,
    window: std::ops::Range<Instant>,
    lag_us: Vec<u64>,
    skipped_busy: u64,
) -> Summary {
    let (from, end) = (window.start, window.end);
    let mut samples = fleet.stats.lock().map(|s| s.clone()).unwrap_or_default();
    samples.retain(|s| s.finished >= from);
    let mut by_kind: BTreeMap<&'static str, KindSummary> = BTreeMap::new();
    let mut kind_lat: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for h in &fleet.hosts {
        by_kind.entry(h.kind.name()).or_default().hosts += 1;
    }
    let mut errors = BTreeMap::new();
    let (mut attestations, mut trusted, mut untrusted) = (0u64, 0u64, 0u64);
    let (mut total, mut evidence, mut connect) = (Vec::new(), Vec::new(), Vec::new());
    let (mut resumed, mut full) = (0u64, 0u64);
    for s in &samples {
        let k = by_kind.entry(s.kind.name()).or_default();
        k.attempts += 1;
        if s.connect_us > 0 {
            if s.resumed {
                resumed += 1;
            } else {
                full += 1;
            }
        }
        match &s.outcome {
            Outcome::Verdict {
                trusted: t,
                code,
                pcr,
            } => {
                if *t {
                    k.trusted += 1;
                } else {
                    k.untrusted += 1;
                }
                let expected = match s.kind {
                    Kind::Honest => *t,
                    Kind::Tampered => {
                        !*t && code.as_deref() == Some("pcr_not_whitelisted") && pcr.is_some()
                    }
                    Kind::Garbage => false,
                };
                if !expected {
                    k.unexpected += 1;
                }
                if s.finished <= end {
                    attestations += 1;
                    if *t {
                        trusted += 1;
                    } else {
                        untrusted += 1;
                    }
                }
                if s.kind != Kind::Garbage {
                    total.push(s.total_us);
                    evidence.push(s.evidence_us);
                    connect.push(s.connect_us);
                }
                kind_lat.entry(s.kind.name()).or_default().push(s.total_us);
            }
            Outcome::Error(code) => {
                k.errors += 1;
                if s.kind != Kind::Garbage {
                    k.unexpected += 1;
                }
                *errors.entry(code.clone()).or_insert(0u64) += 1;
            }
        }
    }
    for (name, lat) in kind_lat {
        if let Some(k) = by_kind.get_mut(name) {
            k.latency = latency(lat);
        }
    }
    let secs = end
        .saturating_duration_since(from)
        .as_secs_f64()
        .max(f64::MIN_POSITIVE);
    let flood = args.garbage_interval.is_some_and(|g| g == 0.0);
    let scheduled = fleet
        .hosts
        .iter()
        .filter(|h| !(flood && h.kind == Kind::Garbage))
        .count();
    let lat = latency(total);
    Summary {
        mode,
        server_url: format!("https://{}:{}", fleet.target.host, fleet.target.port),
        hosts: fleet.hosts.len(),
        interval_secs: args.interval,
        warmup_secs: if mode == "attest" { args.warmup } else { 0.0 },
        duration_secs: secs,
        concurrency: args.concurrency,
        tls_resumption: !args.no_resumption,
        attestations_per_second: attestations as f64 / secs,
        attestations,
        trusted,
        untrusted,
        target_per_second: if mode == "attest" {
            scheduled as f64 / args.interval
        } else {
            0.0
        },
        p50_ms: lat.p50_ms,
        p99_ms: lat.p99_ms,
        latency: lat,
        evidence_latency: latency(evidence),
        connect_latency: latency(connect),
        tls_resumed: resumed,
        tls_full: full,
        errors,
        by_kind,
        enrollments: fleet.enrollments.load(Ordering::Relaxed),
        enroll_retries: fleet.enroll_retries.load(Ordering::Relaxed),
        whitelists_set: fleet.whitelists.load(Ordering::Relaxed),
        skipped_busy,
        schedule_lag: latency(lag_us),
        setup_secs: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_script_waits_for_the_window_line_this_prints() {
        // bench/load.sh reads the server's counters when it sees this line.
        let script = include_str!("../../../bench/load.sh");
        assert!(script.contains(&format!("\"{WINDOW_OPEN_LINE}\"")));
    }

    #[test]
    fn shares_are_spread_and_exact() {
        let kinds: Vec<Kind> = (0..100).map(|i| kind_of(i, 0.1, 0.05)).collect();
        assert_eq!(kinds.iter().filter(|k| **k == Kind::Garbage).count(), 5);
        assert_eq!(kinds.iter().filter(|k| **k == Kind::Tampered).count(), 10);
        assert!(kinds[..50].contains(&Kind::Tampered) && kinds[50..].contains(&Kind::Tampered));
        assert!((0..10).all(|i| kind_of(i, 0.0, 0.0) == Kind::Honest));
        assert!((0..10).all(|i| kind_of(i, 1.0, 0.0) == Kind::Tampered));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = latency((1..=100).map(|v| v * 1000).collect());
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(latency(Vec::new()), Latency::default());
    }
}
