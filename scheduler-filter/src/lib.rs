//! Keeps workloads on hosts that the attestation server currently trusts.
//!
//! A scheduler hands the filter its candidate hosts; the filter answers with
//! those whose latest verdict is `trusted` and not yet expired, asking the
//! server (`POST /v1/trust/query`, mutual TLS) once per call for whatever
//! it has not cached.
//!
//! ```no_run
//! # async fn place() -> Result<(), scheduler_filter::Error> {
//! use proto::wire::Trust;
//! use scheduler_filter::{load, TrustFilter};
//!
//! let config = load(Some("/etc/tcp/scheduler-filter.toml".as_ref()))?;
//! let filter = TrustFilter::new(&config)?;
//! let candidates = vec!["node-1".to_string(), "node-2".to_string()];
//! let trusted = filter.filter(&candidates, Trust::Trusted).await;
//! for d in filter.decide(&candidates, Trust::Trusted).await {
//!     if !d.allowed {
//!         eprintln!("{}: {}", d.host, d.reason);
//!     }
//! }
//! # let _ = trusted; Ok(()) }
//! ```
//!
//! Configuration (TOML, overridable by `SCHEDULER_FILTER_*` variables, with
//! `__` between nested keys, e.g. `SCHEDULER_FILTER_TLS__CA`):
//!
//! ```toml
//! server_url = "https://attest.example.org:8443"   # required, https only
//! request_timeout_secs = 5                         # default 5
//! max_cache_secs = 60                              # default 60; 0 = no cache
//! [tls]                                            # relative to this file
//! ca = "ca.pem"
//! cert = "scheduler.pem"
//! key = "scheduler.key"
//! ```
//!
//! `scheduler-filter serve` adds a Kubernetes scheduler extender
//! ([`server`], [`extender`]; see `docs/kubernetes.md`) configured by an
//! optional `[extender]` section (`listen`, `tls_cert`, `tls_key`,
//! `report_placements`, `max_body_bytes`), a receiver for the server's
//! signed trust-change pushes ([`TrustFilter::apply_notification`]), and the
//! placement audit ([`TrustFilter::report_placement`]). Signed host-trust
//! tokens verify offline ([`TrustFilter::verify_token`], [`TokenVerifier`]).
//!
//! The filter fails closed: when the server cannot be reached, answers with
//! an error or garbage, leaves a host out, or gives a verdict that has
//! expired, that host does not pass. Invalid host names never pass and are
//! never sent. Verdicts are cached until the earlier of their `expires_at`
//! and `max_cache_secs`; [`TrustFilter::invalidate`] forgets one earlier.
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod decision;
pub mod error;
pub mod extender;
pub mod filter;
pub mod placement;
pub mod server;
pub mod tokens;

pub use cache::VerdictCache;
pub use config::{load, FilterConfig};
pub use decision::{decide_from, effective_trust, Decision, Lookup};
pub use error::Error;
pub use filter::TrustFilter;
pub use tokens::TokenVerifier;
