//! The crate's one error type, and its one mapping to HTTP answers:
//! a status and `{"error": {"code", "message"}}` with a stable code.

use crate::store::StoreError;
use crate::verify::Failure;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::wire::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {key}: {problem}")]
    Config { key: String, problem: String },
    #[error("TLS set-up failed: {0}")]
    TlsSetup(String),
    #[error("this API needs a client certificate issued by the pool's CA")]
    Unauthenticated,
    #[error("client certificate has no usable role: {0}")]
    BadClientCertificate(String),
    #[error("role {role} may not {action}")]
    Forbidden {
        role: &'static str,
        action: &'static str,
    },
    #[error("certificate of host {cert_host} may not act for host {path_host}")]
    HostMismatch {
        cert_host: String,
        path_host: String,
    },
    #[error("{0:?} is not a valid host name")]
    InvalidHostName(String),
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("evidence refused at step {step}: {failure}", step = failure.step().name())]
    Verification { failure: Failure },
    #[error("host {host} has no enrolled attestation key")]
    NotEnrolled { host: String },
    #[error("host {host} is pinned to attestation key {enrolled}; a different key needs an operator's re-key")]
    AkConflict { host: String, enrolled: String },
    #[error("invalid attestation key: {0}")]
    BadAk(String),
    #[error("unknown host {0}")]
    UnknownHost(String),
    #[error("host {0} has no verified evidence yet")]
    NoEvidence(String),
    #[error("invalid whitelist: {0}")]
    BadWhitelist(String),
    #[error("storage unavailable")]
    Storage(#[from] StoreError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            Unauthenticated => StatusCode::UNAUTHORIZED,
            BadClientCertificate(_) | Forbidden { .. } | HostMismatch { .. } => {
                StatusCode::FORBIDDEN
            }
            InvalidHostName(_) | BadBody(_) | BadAk(_) | BadWhitelist(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Verification { failure } => match failure {
                Failure::Decode(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            },
            NotEnrolled { .. } | AkConflict { .. } | NoEvidence(_) => StatusCode::CONFLICT,
            UnknownHost(_) => StatusCode::NOT_FOUND,
            Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            Config { .. } | TlsSetup(_) | Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use Error::*;
        match self {
            Config { .. } => "config_invalid",
            TlsSetup(_) => "tls_setup",
            Unauthenticated => "client_certificate_required",
            BadClientCertificate(_) => "client_certificate_invalid",
            Forbidden { .. } => "forbidden",
            HostMismatch { .. } => "host_mismatch",
            InvalidHostName(_) => "invalid_host_name",
            BadBody(_) => "invalid_body",
            BodyTooLarge { .. } => "body_too_large",
            Verification { failure } => failure.code(),
            NotEnrolled { .. } => "ak_not_enrolled",
            AkConflict { .. } => "ak_conflict",
            BadAk(_) => "ak_invalid",
            UnknownHost(_) => "unknown_host",
            NoEvidence(_) => "no_evidence",
            BadWhitelist(_) => "whitelist_invalid",
            Storage(_) => "storage_unavailable",
            Io { .. } => "io_error",
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            // The detail (a SQL error, a path) is for the log, not the client.
            tracing::error!(error = ?self, "request failed");
        }
        let message = match &self {
            Error::Storage(_) => "the database is unavailable; try again".to_string(),
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message,
            },
        };
        (status, Json(body)).into_response()
    }
}
