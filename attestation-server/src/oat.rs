//! OpenAttestation compatibility for OpenStack Nova's TrustedFilter (up to
//! Pike): `POST {api_url}/PollHosts` on a second HTTPS listener that uses
//! the server certificate but asks for no client certificate (the filter
//! never sends one); the caller proves itself with the `x-auth-blob`
//! header instead. See docs/nova.md.
//!
//! Quirks kept on purpose: `hosts` may be a bare string; every requested
//! host gets an entry (unknown ones `unknown`); `trust_lvl` is lower case;
//! `vtime` is ISO 8601 with a UTC offset, which the filter parses with
//! `timeutils.parse_isotime` and compares with `attestation_auth_timeout`.

use crate::api::{current_trust, Body};
use crate::config::ServerTls;
use crate::error::Error;
use crate::AppState;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// The header Nova's filter authenticates with.
pub const AUTH_HEADER: &str = "x-auth-blob";

/// One host in the PollHosts answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OatHost {
    pub host_name: String,
    pub trust_lvl: String,
    pub vtime: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollResponse {
    pub hosts: Vec<OatHost>,
}

/// TLS for the OAT listener: the server's certificate, no client certificates.
pub fn tls_config(tls: &ServerTls) -> Result<rustls::ServerConfig, Error> {
    let err = |what: String| Error::TlsSetup(what);
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| err(format!("cannot read {}: {e}", tls.cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("bad certificate in {}: {e}", tls.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| err(format!("cannot read key {}: {e}", tls.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // TLS 1.2 too: the filter runs on old Python/OpenSSL stacks.
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(format!("protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err(format!("server certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

pub fn router(state: Arc<AppState>) -> Router {
    let path = format!("{}/PollHosts", state.config.oat.api_url);
    Router::new()
        .route(&path, post(poll_hosts))
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// Serve PollHosts on `listener` until `stop` turns true, then let the
/// requests in flight finish.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: watch::Receiver<bool>) {
    let acceptor = match tls_config(&state.config.tls) {
        Ok(c) => TlsAcceptor::from(Arc::new(c)),
        Err(e) => {
            tracing::error!(error = %e, "OAT listener not started");
            return;
        }
    };
    let app = router(state);
    let mut connections = JoinSet::new();
    let stopping = crate::stopped(stop.clone());
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "OAT accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                connections.spawn(crate::serve_connection(tcp, acceptor.clone(), app.clone(), stop.clone()));
            }
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Compare the presented blob with the configured one in constant time
/// (over digests, so the length leaks nothing either).
fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    let Some(given) = headers.get(AUTH_HEADER) else {
        return false;
    };
    if expected.is_empty() {
        return false;
    }
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected));
    crate::enroll::constant_time_eq(&a, &b)
}

/// The requested host names: a list of strings or one bare string.
fn requested_hosts(body: &serde_json::Value, max: usize) -> Result<Vec<String>, Error> {
    let hosts = body
        .as_object()
        .ok_or_else(|| Error::BadBody("the body must be a JSON object".into()))?
        .get("hosts")
        .ok_or_else(|| Error::BadBody("missing field `hosts`".into()))?;
    let list = match hosts {
        serde_json::Value::String(h) => vec![h.clone()],
        serde_json::Value::Array(items) => {
            if items.len() > max {
                return Err(Error::TooMany {
                    what: "hosts",
                    count: items.len(),
                    max,
                });
            }
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::BadBody("`hosts` must hold only strings".into()))
                })
                .collect::<Result<_, _>>()?
        }
        _ => {
            return Err(Error::BadBody(
                "`hosts` must be a string or a list of strings".into(),
            ))
        }
    };
    Ok(list)
}

fn vtime(t: DateTime<Utc>) -> String {
    // "2026-11-22T19:20:31+00:00": what oslo's parse_isotime reads.
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

async fn poll_hosts(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Body<serde_json::Value>, Error>,
) -> Result<Json<PollResponse>, Error> {
    // Authenticate before looking at the body.
    if !authorized(&headers, &st.config.oat.auth_blob.0) {
        return Err(Error::OatUnauthorized);
    }
    let Body(body) = body?;
    let hosts = requested_hosts(&body, st.config.oat.max_hosts)?;
    let valid: Vec<String> = hosts
        .iter()
        .filter(|h| proto::wire::valid_host_name(h))
        .cloned()
        .collect();
    let found = st.store.verdicts(&valid).await?;
    let now = Utc::now();
    let hosts = hosts
        .into_iter()
        .map(|h| {
            // A name we could never have a verdict for is simply unknown.
            let v = current_trust(&h, found.get(&h).cloned(), now);
            OatHost {
                trust_lvl: v.trust.as_str().to_string(),
                vtime: vtime(v.verified_at.unwrap_or(now)),
                host_name: h,
            }
        })
        .collect();
    Ok(Json(PollResponse { hosts }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hosts_may_be_a_bare_string_or_a_list() {
        assert_eq!(
            requested_hosts(&json!({"count": 1, "hosts": "node1"}), 10).unwrap(),
            ["node1"]
        );
        assert_eq!(
            requested_hosts(&json!({"hosts": ["a", "b"]}), 10).unwrap(),
            ["a", "b"]
        );
        for bad in [
            json!({"hosts": 3}),
            json!({"hosts": [1]}),
            json!([]),
            json!({}),
        ] {
            assert!(
                matches!(requested_hosts(&bad, 10), Err(Error::BadBody(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            requested_hosts(&json!({"hosts": ["a", "b", "c"]}), 2),
            Err(Error::TooMany {
                count: 3,
                max: 2,
                ..
            })
        ));
    }

    #[test]
    fn blob_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "s3cret"));
        h.insert(AUTH_HEADER, "s3cret".parse().unwrap());
        assert!(authorized(&h, "s3cret"));
        assert!(!authorized(&h, "s3cre"));
        assert!(!authorized(&h, ""));
    }

    #[test]
    fn listener_needs_a_blob_and_a_clean_api_url() {
        use crate::config::{Secret, ServerConfig};
        let mut c = ServerConfig::default();
        c.oat.listen = Some(([127, 0, 0, 1], 8444).into());
        assert!(matches!(c.validate(), Err(Error::Config { key, .. }) if key == "oat.auth_blob"));
        c.oat.auth_blob = Secret("s".into());
        c.validate().unwrap();
        c.oat.api_url = "/OpenAttestationWebServices/V1.0/".into();
        assert!(matches!(c.validate(), Err(Error::Config { key, .. }) if key == "oat.api_url"));
    }

    #[test]
    fn vtime_has_a_utc_offset() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(vtime(t), "2026-01-02T03:04:05+00:00");
    }
}
