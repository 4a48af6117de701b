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
    #[error("the attestation key of host {host} has not completed credential activation")]
    NotActivated { host: String },
    #[error("invalid attestation key: {0}")]
    BadAk(String),
    #[error("AK name {claimed} is not the digest of the AK's public area ({computed})")]
    AkNameMismatch { claimed: String, computed: String },
    #[error("invalid endorsement key: {0}")]
    BadEk(String),
    #[error("EK certificate refused: {0}")]
    EkCertificate(#[from] crate::ekcert::EkCertError),
    #[error("host {host} has no EK certificate and is not allowed to enroll without one")]
    EkCertificateRequired { host: String },
    #[error("host {host} is pinned to EK {pinned}; enrolling another EK needs an operator's `attestctl host rekey {host}`")]
    EkConflict { host: String, pinned: String },
    #[error("this EK is already enrolled as host {other_host}")]
    EkInUse { other_host: String },
    #[error("cannot make a credential for this EK: {0}")]
    Credential(#[from] crate::credential::CredentialError),
    #[error("no such enrollment for this host")]
    EnrollmentUnknown,
    #[error("this enrollment was already used")]
    EnrollmentUsed,
    #[error("this enrollment expired at {expired_at}; enroll again")]
    EnrollmentExpired {
        expired_at: chrono::DateTime<chrono::Utc>,
    },
    #[error("the activation proof is wrong")]
    ActivationProofInvalid,
    #[error("unknown host {0}")]
    UnknownHost(String),
    #[error("host {0} has no verified evidence yet")]
    NoEvidence(String),
    #[error("invalid whitelist: {0}")]
    BadWhitelist(String),
    // Whitelist policy (issue 4).
    #[error("invalid policy: {0}")]
    Policy(#[from] proto::policy::PolicyError),
    #[error("no whitelist {name}{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownWhitelist { name: String, version: Option<u32> },
    #[error("whitelist {name} exists (version {version}); update it with base_version {version}")]
    WhitelistExists { name: String, version: u32 },
    #[error("{what} {name} is at version {}, not {} as this change assumes; read it again and redo the change",
        current.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
        base.map(|b| b.to_string()).unwrap_or_else(|| "none".into()))]
    VersionConflict {
        what: &'static str,
        name: String,
        base: Option<u32>,
        current: Option<u32>,
    },
    #[error("{what} {name} is at version {current}: send base_version {current} to change it")]
    BaseVersionRequired {
        what: &'static str,
        name: String,
        current: u32,
    },
    #[error("whitelist {name} is assigned to group(s) {}; remove it from them first", groups.join(", "))]
    WhitelistInUse { name: String, groups: Vec<String> },
    #[error("no host group {0}")]
    UnknownGroup(String),
    #[error("the policy of host {host} kept changing while its evidence was judged; try again")]
    PolicyChanging { host: String },
    #[error("group {name} still has hosts ({}); move them out first", hosts.join(", "))]
    GroupInUse { name: String, hosts: Vec<String> },
    #[error("storage unavailable: {0}")]
    Storage(#[from] StoreError),
    #[error("no such API route")]
    NotFound,
    #[error("the request took longer than {secs} s")]
    RequestTimeout { secs: u64 },
    #[error(
        "too much of host {host}'s evidence was refused lately; try again in {retry_after_secs} s"
    )]
    TooManyFailures { host: String, retry_after_secs: u64 },
    #[error("this API route does not take that method")]
    MethodNotAllowed,
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    // Scheduler integration (OAT PollHosts, tokens, push, placements).
    #[error("missing or wrong x-auth-blob header")]
    OatUnauthorized,
    #[error("{count} {what} in one request; at most {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("this server has no token_key configured: tokens and notifications are off")]
    TokenSigningDisabled,
    #[error("token signing failed: {0}")]
    Token(#[from] proto::token::TokenError),
    #[error("no subscription {0}")]
    SubscriptionUnknown(String),
    #[error("invalid subscription: {0}")]
    BadSubscription(String),
    // Audit trail (events query, export, verify).
    #[error("invalid query parameter {name}: {problem}")]
    InvalidParameter { name: String, problem: String },
    #[error("audit signing key: {0}")]
    AuditKey(#[from] crate::audit::chain::KeyError),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            Unauthenticated => StatusCode::UNAUTHORIZED,
            BadClientCertificate(_) | Forbidden { .. } | HostMismatch { .. } => {
                StatusCode::FORBIDDEN
            }
            InvalidHostName(_)
            | BadBody(_)
            | BadAk(_)
            | AkNameMismatch { .. }
            | BadEk(_)
            | BadWhitelist(_)
            | Policy(_)
            | BaseVersionRequired { .. }
            | Credential(_) => StatusCode::BAD_REQUEST,
            UnknownWhitelist { .. } | UnknownGroup(_) => StatusCode::NOT_FOUND,
            WhitelistExists { .. }
            | VersionConflict { .. }
            | WhitelistInUse { .. }
            | GroupInUse { .. } => StatusCode::CONFLICT,
            EkCertificate(e) => match e {
                crate::ekcert::EkCertError::Malformed { .. }
                | crate::ekcert::EkCertError::KeyMismatch => StatusCode::BAD_REQUEST,
                _ => StatusCode::FORBIDDEN,
            },
            EkCertificateRequired { .. } | ActivationProofInvalid => StatusCode::FORBIDDEN,
            EkConflict { .. } | EkInUse { .. } | EnrollmentUsed | NotActivated { .. } => {
                StatusCode::CONFLICT
            }
            EnrollmentUnknown => StatusCode::NOT_FOUND,
            EnrollmentExpired { .. } => StatusCode::GONE,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Verification { failure } => match failure {
                Failure::Decode(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            },
            NotEnrolled { .. } | NoEvidence(_) => StatusCode::CONFLICT,
            UnknownHost(_) | NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            TooManyFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
            Storage(_) | PolicyChanging { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Config { .. } | TlsSetup(_) | Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            OatUnauthorized => StatusCode::UNAUTHORIZED,
            TooMany { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            TokenSigningDisabled => StatusCode::SERVICE_UNAVAILABLE,
            Token(_) => StatusCode::INTERNAL_SERVER_ERROR,
            SubscriptionUnknown(_) => StatusCode::NOT_FOUND,
            BadSubscription(_) => StatusCode::BAD_REQUEST,
            InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            AuditKey(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
            NotActivated { .. } => "ak_not_activated",
            BadAk(_) => "ak_invalid",
            AkNameMismatch { .. } => "ak_name_mismatch",
            BadEk(_) => "ek_invalid",
            EkCertificate(e) => match e {
                crate::ekcert::EkCertError::Malformed { .. } => "ek_certificate_malformed",
                crate::ekcert::EkCertError::UnknownIssuer { .. } => "ek_certificate_unknown_issuer",
                crate::ekcert::EkCertError::Expired { .. } => "ek_certificate_expired",
                crate::ekcert::EkCertError::NotYetValid { .. } => "ek_certificate_not_yet_valid",
                crate::ekcert::EkCertError::BadSignature { .. } => "ek_certificate_bad_signature",
                crate::ekcert::EkCertError::KeyMismatch => "ek_certificate_key_mismatch",
                _ => "ek_certificate_invalid",
            },
            EkCertificateRequired { .. } => "ek_certificate_required",
            EkConflict { .. } => "ek_conflict",
            EkInUse { .. } => "ek_in_use",
            Credential(_) => "ek_unsupported",
            EnrollmentUnknown => "enrollment_unknown",
            EnrollmentUsed => "enrollment_used",
            EnrollmentExpired { .. } => "enrollment_expired",
            ActivationProofInvalid => "activation_proof_invalid",
            UnknownHost(_) => "unknown_host",
            NoEvidence(_) => "no_evidence",
            BadWhitelist(_) => "whitelist_invalid",
            Policy(e) => e.code(),
            UnknownWhitelist { .. } => "unknown_whitelist",
            WhitelistExists { .. } => "whitelist_exists",
            VersionConflict { .. } => "version_conflict",
            BaseVersionRequired { .. } => "base_version_required",
            WhitelistInUse { .. } => "whitelist_in_use",
            UnknownGroup(_) => "unknown_group",
            PolicyChanging { .. } => "policy_changing",
            GroupInUse { .. } => "group_in_use",
            Storage(_) => "storage_unavailable",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            RequestTimeout { .. } => "request_timeout",
            TooManyFailures { .. } => "too_many_failures",
            Io { .. } => "io_error",
            OatUnauthorized => "oat_auth_failed",
            TooMany { .. } => "too_many",
            TokenSigningDisabled => "token_signing_disabled",
            Token(_) => "token_error",
            SubscriptionUnknown(_) => "subscription_unknown",
            BadSubscription(_) => "subscription_invalid",
            InvalidParameter { .. } => "invalid_parameter",
            AuditKey(_) => "audit_key_invalid",
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
        let mut response = (status, Json(body)).into_response();
        if let Error::TooManyFailures {
            retry_after_secs, ..
        } = &self
        {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(*retry_after_secs),
            );
        }
        response
    }
}
