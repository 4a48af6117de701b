//! The crate's one error type.

use proto::client::ClientError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is missing, unreadable or not valid TOML.
    #[error("config file {}: {problem}", path.display())]
    ConfigFile { path: PathBuf, problem: String },

    /// One configuration key has a bad value, is missing or is not a known key.
    #[error("config key `{key}` ({origin}): {problem}")]
    ConfigKey {
        /// Dotted key, e.g. `tls.ca`.
        key: String,
        /// Where the value came from (file, environment variable, default).
        origin: String,
        problem: String,
    },

    /// The mutual-TLS client could not be built (unreadable or mismatched
    /// certificate files).
    #[error("cannot set up the client for {server_url}: {source}")]
    Client {
        server_url: String,
        source: ClientError,
    },

    /// The trust query failed (network, TLS, error answer, unreadable answer).
    #[error("trust server {server_url} did not answer the trust query: {source}")]
    Query {
        server_url: String,
        source: ClientError,
    },
}
