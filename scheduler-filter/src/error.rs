//! The crate's one error type.

use proto::client::ClientError;
use proto::token::TokenError;
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

    /// A signed token or notification was refused (expired, bad signature,
    /// unknown key, altered or unexpected claims).
    #[error("token rejected: {source}")]
    Token { source: TokenError },

    /// The server's key set could not be fetched.
    #[error("cannot fetch the key set from {server_url}: {source}")]
    Jwks {
        server_url: String,
        source: ClientError,
    },

    /// The placement report was not recorded.
    #[error("trust server {server_url} did not record the placement: {source}")]
    Placement {
        server_url: String,
        source: ClientError,
    },

    /// The extender's certificate or key could not be loaded.
    #[error("extender TLS {}: {problem}", path.display())]
    ExtenderTls { path: PathBuf, problem: String },

    /// The extender could not listen or serve.
    #[error("extender on {addr}: {problem}")]
    Serve { addr: String, problem: String },
}
