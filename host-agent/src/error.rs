//! The crate's one error type.

use proto::client::ClientError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable; `key` is the dotted config key.
    #[error("config key `{key}`: {problem}")]
    Config { key: String, problem: String },

    /// A TPM command (or the TCTI connection to the TPM) failed.
    #[error("TPM {operation}: {detail}")]
    Tpm {
        operation: &'static str,
        detail: String,
    },

    /// The TPM worker thread is gone (it stopped or could not start).
    #[error("the TPM worker thread is not running")]
    TpmWorkerGone,

    /// Talking to the attestation server failed.
    #[error("server: {0}")]
    Server(#[from] ClientError),

    /// The server's challenge cannot be answered as sent.
    #[error("unusable challenge: {field}: {problem}")]
    Challenge {
        field: &'static str,
        problem: String,
    },

    /// The server's enrollment answer (the credential to activate) cannot
    /// be used as sent; `field` is the JSON field.
    #[error("unusable enrollment answer: {field}: {problem}")]
    Enrollment {
        field: &'static str,
        problem: String,
    },

    /// Reading or writing the AK blobs in the state directory failed.
    #[error("state file {}: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn tpm(operation: &'static str, detail: impl ToString) -> Self {
        Error::Tpm {
            operation,
            detail: detail.to_string(),
        }
    }

    pub(crate) fn config(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// True when the same round may succeed later without any change on
    /// this side: the server is unreachable or overloaded, or the TPM is
    /// busy or restarting. The agent backs off on these.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Server(e) => e.is_transient(),
            Error::Tpm { .. } => true,
            _ => false,
        }
    }

    /// The server's stable error code, when the server refused a request.
    pub fn server_code(&self) -> Option<&str> {
        match self {
            Error::Server(e) => e.code(),
            _ => None,
        }
    }
}
