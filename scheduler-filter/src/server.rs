//! `scheduler-filter serve`: the HTTP(S) endpoint kube-scheduler calls
//! (`POST /filter`, `POST /prioritize`), the push receiver the attestation
//! server calls (`POST /notify`) and a liveness probe (`GET /healthz`).

use crate::config::FilterConfig;
use crate::error::Error;
use crate::extender::{self, ExtenderArgs, ExtenderFilterResult, Request, Requirement, TRUST_KEY};
use crate::filter::TrustFilter;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use proto::token::JWT_CONTENT_TYPE;
use proto::wire::{ErrorBody, ErrorDetail, Trust};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// What the handlers share.
pub struct Extender {
    pub filter: Arc<TrustFilter>,
    /// Report each filter decision to the server.
    pub report_placements: bool,
}

impl Extender {
    /// The filter verb: pods without the trust key pass through untouched;
    /// for the others every node that is not trusted now fails, with why.
    pub async fn filter(&self, req: Request) -> ExtenderFilterResult {
        match req.requirement {
            Requirement::None => extender::pass_all(req.candidates),
            Requirement::Invalid(value) => {
                let why = format!(
                    "pod sets {TRUST_KEY}={value:?}; only {:?} is supported",
                    extender::TRUST_VALUE
                );
                tracing::warn!(workload = %req.workload, "{why}");
                extender::fail_all(req.candidates, &why)
            }
            Requirement::Trusted => {
                let names = req.candidates.names();
                let decisions = self.filter.decide(&names, Trust::Trusted).await;
                if self.report_placements {
                    // The audit trail must not decide placement: a failed
                    // report is logged, the decision stands.
                    match self
                        .filter
                        .report_placement(&req.workload, &decisions)
                        .await
                    {
                        Ok(n) => {
                            tracing::debug!(workload = %req.workload, recorded = n, "placement reported")
                        }
                        Err(e) => {
                            tracing::warn!(workload = %req.workload, error = %e, "placement report failed")
                        }
                    }
                }
                extender::filter_result(req.candidates, &decisions, Utc::now())
            }
        }
    }

    /// The prioritize verb: 0 for every node of a pod that asks nothing
    /// (the extender does not steer those), else fresher verdicts higher.
    pub async fn prioritize(&self, req: Request) -> Vec<extender::HostPriority> {
        let names = req.candidates.names();
        let decisions = match req.requirement {
            Requirement::Trusted => self.filter.decide(&names, Trust::Trusted).await,
            Requirement::None | Requirement::Invalid(_) => Vec::new(),
        };
        extender::priorities(&names, &decisions, Utc::now())
    }
}

/// The routes, with the body limit.
pub fn router(ext: Arc<Extender>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/notify", post(notify))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(ext)
}

/// Read and check ExtenderArgs; a refusal is the status and the text for
/// the `Error` field.
fn read_args(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Request, (StatusCode, String)> {
    let bytes = body.map_err(|e| {
        (
            e.status(),
            format!("cannot read ExtenderArgs: {}", e.body_text()),
        )
    })?;
    let args: ExtenderArgs = serde_json::from_slice(&bytes).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("malformed ExtenderArgs: {e}"),
        )
    })?;
    extender::parse(args).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("malformed ExtenderArgs: {e}"),
        )
    })
}

fn refuse(status: StatusCode, message: String) -> Response {
    tracing::warn!(%status, "extender request refused: {message}");
    (status, Json(ExtenderFilterResult::error(message))).into_response()
}

async fn filter(
    State(ext): State<Arc<Extender>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match read_args(body) {
        Ok(req) => Json(ext.filter(req).await).into_response(),
        Err((status, message)) => refuse(status, message),
    }
}

async fn prioritize(
    State(ext): State<Arc<Extender>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match read_args(body) {
        Ok(req) => Json(ext.prioritize(req).await).into_response(),
        Err((status, message)) => refuse(status, message),
    }
}

fn error_body(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message,
        },
    };
    (status, Json(body)).into_response()
}

/// A pushed trust change: a JWT signed by the server. Genuine ones drop the
/// host from the cache; anything else is 401 and changes nothing.
async fn notify(
    State(ext): State<Arc<Extender>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let is_jwt = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(JWT_CONTENT_TYPE));
    if !is_jwt {
        return error_body(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("a notification is sent as {JWT_CONTENT_TYPE}"),
        );
    }
    let bytes = match body {
        Ok(b) => b,
        Err(e) => return error_body(e.status(), "bad_body", e.body_text()),
    };
    let Ok(token) = std::str::from_utf8(&bytes) else {
        return error_body(
            StatusCode::UNAUTHORIZED,
            "invalid_notification",
            "the token is not UTF-8".into(),
        );
    };
    match ext.filter.apply_notification(token.trim()).await {
        Ok(change) => Json(serde_json::json!({"invalidated": change.sub})).into_response(),
        // Cannot check it now: the sender retries.
        Err(e @ Error::Jwks { .. }) => error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            "keys_unavailable",
            e.to_string(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "notification refused");
            error_body(
                StatusCode::UNAUTHORIZED,
                "invalid_notification",
                e.to_string(),
            )
        }
    }
}

/// The server-side TLS configuration of the extender (TLS 1.2 and 1.3, as
/// kube-scheduler's Go client negotiates either).
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, Error> {
    let bad = |path: &Path, problem: String| Error::ExtenderTls {
        path: path.to_path_buf(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(key, format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serve `app` on `listener` (HTTPS when `tls` is given) until `shutdown`
/// resolves, then let the requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (app, stop) = (app.clone(), stop_rx.clone());
                match acceptor.clone() {
                    None => connections.spawn(serve_connection(tcp, app, stop)),
                    Some(acceptor) => connections.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => serve_connection(stream, app, stop).await,
                            Ok(Err(e)) => tracing::info!(error = %e, "TLS handshake refused"),
                            Err(_) => {}
                        }
                    }),
                };
            }
        }
    }
    let _ = stop_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn serve_connection<S>(stream: S, app: Router, stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = &mut conn => {}
        _ = stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Build everything from the configuration and serve on `listen` (or the
/// configured address) until `shutdown` resolves.
pub async fn run(
    config: &FilterConfig,
    listen: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let addr = listen.unwrap_or(config.extender.listen);
    let tls = match (&config.extender.tls_cert, &config.extender.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls_config(cert, key)?)),
        _ => None,
    };
    let ext = Arc::new(Extender {
        filter: Arc::new(TrustFilter::new(config)?),
        report_placements: config.extender.report_placements,
    });
    let listener = TcpListener::bind(addr).await.map_err(|e| Error::Serve {
        addr: addr.to_string(),
        problem: e.to_string(),
    })?;
    tracing::info!(%addr, tls = tls.is_some(), server = %ext.filter.server_url(), "scheduler extender ready");
    serve(
        listener,
        router(ext, config.extender.max_body_bytes),
        tls,
        shutdown,
    )
    .await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
