//! The attestation loop: enroll (register the EK and AK, activate the
//! server's credential with the TPM, prove it), then every interval fetch a
//! challenge, quote the requested PCRs with its nonce and send the evidence.

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::enrollment;
use crate::error::Error;
use crate::eventlogs;
use crate::tpm::{AkInfo, Tpm};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use proto::client::{ApiClient, ClientError};
use proto::wire::{
    ActivateRequest, ActivateResponse, Challenge, EnrollRequest, EnrollResponse, Evidence,
    HostTrust, ImaEvidence, Trust,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tracing::{error, info, warn};

pub use crate::enrollment::AK_NOT_ENROLLED;
/// Shortest nonce accepted from a server (the API promises at least 16 bytes).
pub const MIN_NONCE_LEN: usize = 16;
/// First retry delay after a transient failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// `{}`: the challenge request has no fields.
#[derive(Serialize)]
struct EmptyBody {}

/// One host's agent: its TPM worker and its server client.
pub struct Agent {
    host: String,
    client: ApiClient,
    tpm: Tpm,
    /// The AK as the TPM worker last reported it; `None` until ensured, or
    /// after the TPM could no longer load it.
    ak: Option<AkInfo>,
    /// Whether the server has activated `ak`.
    enrolled: bool,
    uefi_log_path: PathBuf,
    ima_log_path: PathBuf,
}

impl Agent {
    /// Start the TPM worker and prepare the mutual-TLS client. Opens no
    /// connection yet.
    pub fn new(config: &AgentConfig) -> Result<Self, Error> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::State {
            path: config.state_dir.clone(),
            source,
        })?;
        let timeout = Duration::from_secs(config.request_timeout_secs);
        let client =
            ApiClient::new(&config.server_url, &config.tls, timeout).map_err(|e| match e {
                ClientError::Tls(problem) => Error::config("tls", problem),
                other => Error::Server(other),
            })?;
        let tpm = Tpm::start(&config.tcti, config.ak_type, &config.state_dir)?;
        Ok(Self {
            host: config.host.clone(),
            client,
            tpm,
            ak: None,
            enrolled: false,
            uefi_log_path: config.uefi_log_path.clone(),
            ima_log_path: config.ima_log_path.clone(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn tpm(&self) -> &Tpm {
        &self.tpm
    }

    /// The enrolled (activated) AK, if enrollment succeeded.
    pub fn enrolled_ak(&self) -> Option<&AkInfo> {
        self.ak.as_ref().filter(|_| self.enrolled)
    }

    fn path(&self, what: &str) -> String {
        // Host names are DNS-label characters only (validated), URL-safe.
        format!("/v1/agents/{}/{what}", self.host)
    }

    /// Enroll: make sure the AK exists, send the server the EK (public
    /// area and certificate) and the AK, activate the credential it answers
    /// with on the TPM (which works only if the AK and EK live in this TPM)
    /// and send the proof of the recovered secret.
    pub async fn enroll(&mut self) -> Result<ActivateResponse, Error> {
        self.enrolled = false;
        let ak = match &self.ak {
            Some(ak) => ak.clone(),
            None => {
                let ak = self.tpm.ensure_ak().await?;
                self.ak = Some(ak.clone());
                ak
            }
        };
        let ek = self.tpm.ek_identity().await?;
        if ek.certificate.is_none() {
            warn!("the TPM has no EK certificate; the server must know this host's EK");
        }
        let request = EnrollRequest {
            ek_certificate: ek.certificate.as_deref().map(|der| BASE64.encode(der)),
            ek_public: BASE64.encode(&ek.public),
            ak_public: BASE64.encode(&ak.public),
            ak_name: Some(hex::encode(&ak.name)),
        };
        let offer: EnrollResponse = self.client.post(&self.path("enroll"), &request).await?;
        let (id_object, encrypted_secret) = enrollment::decode_credential(&offer)?;
        let secret = match self
            .tpm
            .activate_credential(&id_object, &encrypted_secret)
            .await
        {
            Ok(secret) => secret,
            Err(e) => {
                if matches!(e, Error::Tpm { .. }) {
                    // The worker's AK may no longer be the one just sent
                    // (TPM cleared, blobs replaced): start over from the TPM.
                    self.ak = None;
                }
                return Err(e);
            }
        };
        let proof = ActivateRequest {
            enrollment_id: offer.enrollment_id,
            proof: enrollment::activation_proof(&secret, &self.host)?,
        };
        let activated: ActivateResponse = self.client.post(&self.path("activate"), &proof).await?;
        let ours = hex::encode(&ak.name);
        if !activated.ak_name.eq_ignore_ascii_case(&ours) {
            // Quotes would then fail verification; say so plainly.
            warn!(server = %activated.ak_name, agent = %ours, "the server activated another AK name");
        }
        info!(
            ak_name = %ours,
            ek_certificate = ek.certificate.is_some(),
            "AK enrolled and activated"
        );
        self.enrolled = true;
        Ok(activated)
    }

    /// One attestation round: enroll if needed, then challenge, quote and
    /// evidence. If the server asks for enrollment (it lost or expired ours,
    /// or never activated the AK), enroll and try once more.
    pub async fn attest_once(&mut self) -> Result<HostTrust, Error> {
        match self.round().await {
            Err(e) if e.server_code().is_some_and(enrollment::requires_enrollment) => {
                info!(
                    code = e.server_code(),
                    "the server asks for enrollment; enrolling again"
                );
                self.enrolled = false;
                self.round().await
            }
            outcome => outcome,
        }
    }

    async fn round(&mut self) -> Result<HostTrust, Error> {
        if !self.enrolled {
            self.enroll().await?;
        }
        let challenge: Challenge = self
            .client
            .post(&self.path("challenge"), &EmptyBody {})
            .await?;
        let nonce = decode_nonce(&challenge.nonce)?;
        let quote = match self.tpm.quote(&nonce, &challenge.pcr_selection).await {
            Ok(q) => q,
            Err(e) => {
                if matches!(
                    e,
                    Error::Tpm {
                        operation: "load AK",
                        ..
                    }
                ) {
                    // The AK is gone (TPM cleared?): a new one needs enrolling.
                    self.ak = None;
                    self.enrolled = false;
                }
                return Err(e);
            }
        };
        // After the quote: the logs then cover at least what it covers.
        let (uefi_log, ima) = self.read_logs(&challenge).await;
        let evidence = Evidence {
            nonce: challenge.nonce,
            attest: BASE64.encode(&quote.attest),
            signature: BASE64.encode(&quote.signature),
            pcrs: quote.pcrs,
            uefi_log,
            ima,
        };
        Ok(self.client.post(&self.path("evidence"), &evidence).await?)
    }

    /// The logs the challenge asks for. A log that cannot be read is left
    /// out with a warning: the server then judges the host without it, and
    /// a policy that needs it fails (fail closed, with the reason named).
    async fn read_logs(&self, challenge: &Challenge) -> (Option<String>, Option<ImaEvidence>) {
        let uefi_path = self.uefi_log_path.clone();
        let ima_path = self.ima_log_path.clone();
        let want_uefi = challenge.uefi_log;
        let ima_from = challenge.ima_from;
        let read = tokio::task::spawn_blocking(move || {
            let uefi = want_uefi
                .then(|| eventlogs::read_uefi_log(&uefi_path, eventlogs::MAX_LOG_BYTES))
                .and_then(|r| {
                    r.map_err(
                        |e| warn!(error = %e, "the server asked for the UEFI event log; not sent"),
                    )
                    .ok()
                });
            let ima = ima_from
                .map(|from| eventlogs::read_ima(&ima_path, from, eventlogs::MAX_LOG_BYTES))
                .and_then(|r| {
                    r.map_err(|e| warn!(error = %e, "the server asked for the IMA list; not sent"))
                        .ok()
                });
            (uefi, ima)
        });
        read.await.unwrap_or_else(|e| {
            warn!(error = %e, "reading the event logs failed");
            (None, None)
        })
    }

    /// Stop the TPM worker (after its current request, if any).
    pub async fn shutdown(self) {
        self.tpm.shutdown().await;
    }
}

fn decode_nonce(nonce_hex: &str) -> Result<Vec<u8>, Error> {
    let nonce = hex::decode(nonce_hex).map_err(|e| Error::Challenge {
        field: "nonce",
        problem: format!("not hex: {e}"),
    })?;
    if nonce.len() < MIN_NONCE_LEN {
        return Err(Error::Challenge {
            field: "nonce",
            problem: format!("{} bytes, expected at least {MIN_NONCE_LEN}", nonce.len()),
        });
    }
    Ok(nonce)
}

fn log_verdict(verdict: &HostTrust) {
    let reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.code.as_str()).collect();
    match verdict.trust {
        Trust::Trusted => info!(trust = "trusted", expires_at = ?verdict.expires_at, "attested"),
        other => warn!(trust = other.as_str(), reasons = ?reasons, "attested, host not trusted"),
    }
}

/// Run the agent until `shutdown` completes: enroll, then attest every
/// `interval_secs`, backing off (exponentially, with jitter, capped at
/// `backoff_max_secs`) while the server or the TPM is unavailable. On
/// shutdown the round in progress is abandoned and the TPM worker stopped.
///
/// Errors only when the agent cannot start (TLS files, state directory).
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let mut agent = Agent::new(&config)?;
    let interval = Duration::from_secs(config.interval_secs);
    let mut backoff = Backoff::new(BACKOFF_BASE, Duration::from_secs(config.backoff_max_secs));
    let mut rng = StdRng::from_entropy();
    tokio::pin!(shutdown);
    info!(host = %config.host, server = %config.server_url, "host agent started");
    loop {
        let outcome = tokio::select! {
            biased;
            () = &mut shutdown => break,
            outcome = agent.attest_once() => outcome,
        };
        let delay = match outcome {
            Ok(verdict) => {
                backoff.reset();
                log_verdict(&verdict);
                interval
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay(&mut rng);
                warn!(error = %e, retry_in = ?delay, "attestation failed; backing off");
                delay
            }
            Err(e) => {
                error!(error = %e, "attestation failed");
                interval
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn termination_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received"),
        () = term => info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_must_be_hex_and_long_enough() {
        assert_eq!(decode_nonce(&"ab".repeat(16)).unwrap(), vec![0xab; 16]);
        assert!(matches!(
            decode_nonce(&"ab".repeat(15)),
            Err(Error::Challenge { field: "nonce", .. })
        ));
        assert!(matches!(
            decode_nonce("zz"),
            Err(Error::Challenge { field: "nonce", .. })
        ));
    }

    #[test]
    fn empty_body_is_an_empty_object() {
        assert_eq!(serde_json::to_string(&EmptyBody {}).unwrap(), "{}");
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        let transport = Error::Server(ClientError::Transport {
            url: "https://x".into(),
            detail: "refused".into(),
        });
        assert!(transport.is_transient());
        let server_5xx = Error::Server(ClientError::Api {
            status: 503,
            code: "unavailable".into(),
            message: String::new(),
        });
        assert!(server_5xx.is_transient());
        let not_enrolled = Error::Server(ClientError::Api {
            status: 409,
            code: AK_NOT_ENROLLED.into(),
            message: String::new(),
        });
        assert!(!not_enrolled.is_transient());
        assert_eq!(not_enrolled.server_code(), Some(AK_NOT_ENROLLED));
        assert!(Error::tpm("connect", "refused").is_transient());
        // A malformed credential does not get better by retrying at once.
        let bad_offer = Error::Enrollment {
            field: "credential_blob",
            problem: "not base64".into(),
        };
        assert!(!bad_offer.is_transient());
        assert!(!Error::config("host", "bad").is_transient());
    }
}
