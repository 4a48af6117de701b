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
    let _ = tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stdout));
}

/// The subscriber [`init`] installs, writing to `writer`. In JSON, each
/// line carries the fields of the span it was written in (`span`, holding
/// the request id), not the list of enclosing spans.
fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
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

    /// Log lines written into a shared buffer.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// In JSON logs, every line written while a request is served carries
    /// its id, which the answer echoes: the client's when usable, else a
    /// new UUID.
    #[tokio::test(flavor = "current_thread")]
    async fn json_lines_carry_the_request_id_the_answer_echoes() {
        use tower::ServiceExt;
        let lines = Lines::default();
        let sink = lines.clone();
        let _guard = tracing::subscriber::set_default(subscriber(
            LogFormat::Json,
            tracing_subscriber::EnvFilter::new("debug"),
            move || sink.clone(),
        ));
        let app = axum::Router::new()
            .route(
                "/x",
                axum::routing::get(|| async {
                    tracing::info!(step = "handler", "inside the handler");
                    "ok"
                }),
            )
            .layer(axum::middleware::from_fn(request_id));
        let call = |id: Option<&'static str>| {
            let mut req = Request::builder().uri("/x");
            if let Some(id) = id {
                req = req.header(REQUEST_ID, id);
            }
            app.clone()
                .oneshot(req.body(axum::body::Body::empty()).unwrap())
        };
        let echoed = |resp: &Response| resp.headers()[&REQUEST_ID].to_str().unwrap().to_string();
        let kept = call(Some("req-7")).await.unwrap();
        assert_eq!(echoed(&kept), "req-7");
        // Not usable in a log line: replaced by a fresh id.
        let replaced = call(Some("a b")).await.unwrap();
        let fresh = echoed(&replaced);
        assert!(uuid::Uuid::parse_str(&fresh).is_ok(), "{fresh}");

        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ids_of = |message: &str| {
            logged
                .iter()
                .filter(|l| l["fields"]["message"] == message)
                .map(|l| {
                    l["span"]["request_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ids_of("inside the handler"), ["req-7", fresh.as_str()]);
        assert_eq!(ids_of("request served"), ["req-7", fresh.as_str()]);
        assert!(logged.iter().all(|l| l["level"].is_string()), "{text}");
    }
}
