//! The mutual-TLS JSON client that the host agent, the scheduler filter and
//! `attestctl` use to talk to the attestation server.
//!
//! TLS 1.3 only, the operator's CA as the only root (no system roots), and a
//! client certificate always presented.

use crate::wire::ErrorBody;
use reqwest::{Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Certificate files of a client identity.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM bundle of the CA(s) that issued the server certificate.
    pub ca: PathBuf,
    /// PEM certificate (chain) of this client.
    pub cert: PathBuf,
    /// PEM private key of this client (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths only; the key's contents never reach a log.
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("cannot reach {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("server answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unreadable answer from {url}: {detail}")]
    Decode { url: String, detail: String },
}

impl ClientError {
    /// True when trying again later may help (network trouble, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
    /// The server's stable error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Build a rustls client configuration from PEM files.
pub fn rustls_config(files: &TlsFiles) -> Result<rustls::ClientConfig, ClientError> {
    let tls = |what: &str, path: &PathBuf, e: &dyn fmt::Display| {
        ClientError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&files.ca)
        .map_err(|e| tls("cannot read CA file", &files.ca, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("bad CA file", &files.ca, &e))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| tls("bad CA certificate in", &files.ca, &e))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(format!(
            "no CA certificate in {}",
            files.ca.display()
        )));
    }
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| tls("cannot read certificate", &files.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("bad certificate file", &files.cert, &e))?;
    if chain.is_empty() {
        return Err(ClientError::Tls(format!(
            "no certificate in {}",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| tls("cannot read key", &files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| ClientError::Tls(format!("client certificate and key do not match: {e}")))
}

/// A JSON API client of one server, or of several that share one pool
/// (one PostgreSQL): `base_url` may list them separated by commas.
///
/// A request goes to the server that last answered; if that one cannot be
/// reached (the request was never sent) or answers 503, the next one is
/// tried, so a client fails over without sending a request twice.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    current: Arc<std::sync::atomic::AtomicUsize>,
}

/// The server URLs of a `server_url` setting: one URL, or several
/// separated by commas (whitespace around them is ignored).
pub fn server_urls(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

impl ApiClient {
    pub fn new(base_url: &str, files: &TlsFiles, timeout: Duration) -> Result<Self, ClientError> {
        let config = rustls_config(files)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let bases = server_urls(base_url);
        if bases.is_empty() {
            return Err(ClientError::Tls("no server URL given".into()));
        }
        Ok(Self {
            http,
            bases: Arc::new(bases),
            current: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// The server requests go to now.
    pub fn base_url(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.bases
            .get(i % self.bases.len().max(1))
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), R>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), R>(Method::DELETE, path, None).await
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        use std::sync::atomic::Ordering;
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..n {
            let i = (first + step) % n;
            let Some(base) = self.bases.get(i) else { break };
            match self.call_one(base, method.clone(), path, body).await {
                Err(Failover(e)) => last = Some(e),
                Ok(answer) => {
                    if step > 0 {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return answer;
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Tls("no server URL given".into())))
    }

    /// One server: `Err(Failover)` when another server should be tried.
    async fn call_one<B: Serialize, R: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Result<R, ClientError>, Failover> {
        let url = format!("{base}{path}");
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let err = ClientError::Transport {
                    url: url.clone(),
                    detail: error_chain(&e),
                };
                // Only a request that never reached the server is safe to
                // send to another one.
                return if e.is_connect() {
                    Err(Failover(err))
                } else {
                    Ok(Err(err))
                };
            }
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Ok(Err(ClientError::Transport {
                    url: url.clone(),
                    detail: error_chain(&e),
                }))
            }
        };
        if status.is_success() {
            return Ok(
                serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
                    url,
                    detail: e.to_string(),
                }),
            );
        }
        let err = api_error(status, &bytes);
        // 503: that server cannot serve now (its database is away); it did
        // nothing, so another may.
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(Failover(err));
        }
        Ok(Err(err))
    }
}

/// A failure after which the next server is tried.
struct Failover(ClientError);

fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            status: status.as_u16(),
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "http_error".into(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        },
    }
}

/// reqwest hides the useful part (the TLS alert, the refused connection) in
/// the source chain; flatten it so operators see it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
