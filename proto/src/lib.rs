//! Shared vocabulary of the trusted compute pool: the JSON wire types every
//! component speaks, pure-Rust decoding of the TPM 2.0 structures the server
//! checks, and the DMTF CADF event model.
//!
//! This crate depends on no other crate of the workspace and links no C code,
//! so the server, the scheduler filter and fuzzers can use it without libtss2.
#![forbid(unsafe_code)]

pub mod bootpolicy;
pub mod cadf;
pub mod eventlog;
pub mod ima;
pub mod policy;
pub mod runtime_policy;
pub mod token;
pub mod tpm;
pub mod wire;

pub use tpm::{HashAlg, TpmError};
#[cfg(feature = "client")]
pub mod client;
