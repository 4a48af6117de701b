//! Logs: text or JSON lines, and a request id on every request.
//!
//! Each request gets an id (the client's `x-request-id` if it is a short
//! token, else a new UUID), echoed in the answer's `x-request-id` header and
//! attached to every log line written while the request is served, so one
//! grep finds everything a request did.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Install the global subscriber (binaries only); `RUST_LOG` filters.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// A client's id is kept only if it cannot smuggle anything into a log line.
fn usable(id: &HeaderValue) -> Option<String> {
    let s = id.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| s.to_string())
}

/// Middleware: give the request an id, serve it inside a span carrying
/// that id, log its outcome, and return the id to the client.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(usable)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request served"
        );
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_ids_are_kept() {
        let keep = HeaderValue::from_static("req-42_a.b");
        assert_eq!(usable(&keep).as_deref(), Some("req-42_a.b"));
        for bad in ["", "a b", "x\"y", "{json}"] {
            assert_eq!(usable(&HeaderValue::from_static(bad)), None, "{bad:?}");
        }
        let long = HeaderValue::from_str(&"a".repeat(65)).unwrap();
        assert_eq!(usable(&long), None);
    }
}
