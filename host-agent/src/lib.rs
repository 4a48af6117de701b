//! Host agent of the trusted compute pool: reads the host's TPM 2.0 through
//! tss-esapi and attests to the attestation server over mutual TLS.
//!
//! - [`config`]: the agent's configuration ([`AgentConfig`], [`config::load`]).
//! - [`tpm`]: the TPM worker thread (AK creation and reuse, EK identity,
//!   credential activation, quotes).
//! - [`enrollment`]: the enrollment protocol's pure parts (refusal codes,
//!   activation proof).
//! - [`agent`]: enrollment and the attestation loop ([`run`], [`Agent`]).
//! - [`eventlogs`]: reading the UEFI and IMA logs a challenge asks for.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod config;
pub mod enrollment;
pub mod error;
pub mod eventlogs;
pub mod tpm;

pub use agent::{run, termination_signal, Agent};
pub use config::{AgentConfig, AkType};
pub use error::Error;
