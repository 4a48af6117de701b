//! The attestation server: verifies TPM quotes from host agents over mutual
//! TLS, stores trust verdicts, emits every attestation as a CADF event, and
//! answers schedulers which hosts are trusted.
//!
//! Tests start it in-process with [`serve`] on a listener bound to port 0.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod challenge;
pub mod config;
pub mod credential;
pub mod ctl;
pub mod ekcert;
pub mod enroll;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod oat;
pub mod pki;
pub mod placement;
pub mod push;
pub mod simulate;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod token;
pub mod verify;
pub mod whitelist;

use crate::config::ServerConfig;
use crate::error::Error;
use crate::store::Store;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Shared state of the request handlers.
pub struct AppState {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    /// Wakes the audit deliverers after an event was committed.
    pub audit_wake: Arc<Notify>,
    /// Delivery health of each audit sink (`GET /v1/audit/status`).
    pub audit_board: Arc<audit::sinks::StatusBoard>,
    /// Bounds how many refused requests per second are audited.
    pub audit_refusals: audit::tasks::RefusalBudget,
    pub tls: Arc<rustls::ServerConfig>,
    /// Trust anchors and intermediates for EK certificates.
    pub ek_roots: ekcert::EkRoots,
    /// Signs host-trust tokens and trust-change notifications (`token_key`).
    pub token: Option<Arc<token::Signer>>,
    /// Trust changes waiting to be pushed to subscribers.
    pub push: Arc<push::Push>,
    /// Attestation counters and latency for `GET /metrics`.
    pub metrics: metrics::Metrics,
    /// Hosts whose evidence keeps being refused.
    pub throttle: throttle::FailureThrottle,
    /// Issue and check challenge nonces; the same keys on every server of
    /// the pool (reloaded when a host record shows a newer generation).
    pub challenge_keys: challenge::PoolKeys,
}

impl AppState {
    /// Open the database (running migrations) and load the TLS identity.
    pub async fn new(config: ServerConfig) -> Result<Arc<Self>, Error> {
        let tls = Arc::new(tls::server_config(&config.tls)?);
        let ek_roots = ekcert::EkRoots::load(&config.ek_ca).map_err(|e| Error::Config {
            key: "ek_ca".into(),
            problem: e.to_string(),
        })?;
        if config.ek_ca.is_empty() {
            tracing::warn!("no ek_ca configured: every EK certificate will be refused as from an unknown issuer");
        }
        let token = config
            .token_key
            .as_deref()
            .map(token::Signer::load)
            .transpose()?
            .map(Arc::new);
        let store = store::open(&config.database_url.0).await?;
        let challenge_keys = challenge::PoolKeys::new(challenge::KeyRing::new(
            &store.challenge_keys().await?,
            chrono::Duration::seconds(config.challenge_ttl_secs as i64),
        ));
        let throttle = throttle::FailureThrottle::new(
            config.failure_burst,
            Duration::from_secs(config.failure_refill_secs),
        );
        Ok(Arc::new(Self {
            config,
            store,
            audit_wake: Arc::new(Notify::new()),
            audit_board: Arc::default(),
            audit_refusals: audit::tasks::RefusalBudget::default(),
            tls,
            ek_roots,
            token,
            push: Arc::new(push::Push::default()),
            metrics: metrics::Metrics::default(),
            throttle,
            challenge_keys,
        }))
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serve the API on `listener` until `shutdown` resolves, then finish the
/// requests in flight. Also runs the background tasks (audit delivery,
/// expired-challenge pruning) for as long as it serves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = JoinSet::new();
    // Audit sinks, checkpoints, trust scanner, retention.
    audit::tasks::spawn(&state, &mut background, || stopped(stop_rx.clone()))?;
    background.spawn(prune_challenges(state.clone(), stopped(stop_rx.clone())));
    // Scheduler integration: trust-change push and the OAT (Nova) listener.
    let push_client = push::client(&state)?;
    background.spawn(push::deliver(
        state.clone(),
        push_client,
        stopped(stop_rx.clone()),
    ));
    background.spawn(push::scan_expiries(state.clone(), stopped(stop_rx.clone())));
    if let Some(addr) = state.config.oat.listen {
        let oat_listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
            path: addr.to_string(),
            source,
        })?;
        tracing::info!(listen = %addr, "OAT PollHosts listener ready");
        background.spawn(oat::serve(oat_listener, state.clone(), stop_rx.clone()));
    }

    let app = api::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::tasks::audit_refusals,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_deadline,
        ))
        .layer(axum::middleware::from_fn(logging::request_id));
    // At most max_connections at once: when all are taken, accepting
    // pauses and new clients wait in the kernel's backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    let acceptor = TlsAcceptor::from(state.tls.clone());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            slot = slots.clone().acquire_owned() => {
                let Ok(slot) = slot else { break };
                let accepted = tokio::select! {
                    _ = &mut shutdown => break,
                    a = listener.accept() => a,
                };
                let (tcp, _addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, don't spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let serve = serve_connection(tcp, acceptor.clone(), app.clone(), stop_rx.clone());
                connections.spawn(async move {
                    serve.await;
                    drop(slot);
                });
            }
        }
    }
    let _ = stop_tx.send(true);
    let drain = async {
        while connections.join_next().await.is_some() {}
        while background.join_next().await.is_some() {}
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

/// Middleware: a request (its body included) gets `request_timeout_secs`,
/// then `408 request_timeout`; a slow client cannot hold a worker forever.
async fn request_deadline(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limit = Duration::from_secs(state.config.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => Error::RequestTimeout {
            secs: state.config.request_timeout_secs,
        }
        .into_response(),
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serve one accepted connection: the TLS handshake, then HTTP/1.1 with
/// each request carrying the client's identity, until the client is done
/// or `stop` says to finish (the `tls_floor` bench serves its canned
/// answers through it too).
pub async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    app: axum::Router,
    stop: watch::Receiver<bool>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => return,
    };
    let peer: tls::Peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(tls::identity);
    let svc = app.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        _ = &mut conn => {}
        _ = stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn prune_challenges(state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        // Keep expired nonces a while so a late replay is named a replay.
        let before = chrono::Utc::now() - chrono::Duration::hours(1);
        if let Err(e) = state.store.prune_challenges(before).await {
            tracing::warn!(error = %e, "pruning expired challenges failed");
        }
    }
}

/// Load the configuration, open the database and serve until SIGTERM/Ctrl-C.
pub async fn run(config: ServerConfig) -> Result<(), Error> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Io {
            path: config.listen.to_string(),
            source,
        })?;
    let state = AppState::new(config).await?;
    tracing::info!(listen = %state.config.listen, "attestation server ready");
    serve(listener, state, shutdown_signal()).await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
