//! Test harness for the attestation service.
//!
//! [`SwTpm`] gives every test its own software TPM (swtpm): a fresh state
//! directory, its own local CA for the EK and platform certificates, and its
//! own TCP ports, so tests can run concurrently without sharing anything.

#![forbid(unsafe_code)]

mod local_ca;
mod manifest;
mod ports;
mod swtpm;
mod tools;

pub use manifest::yaml_block;
pub use swtpm::SwTpm;
pub use tools::{require_tools, REQUIRED_TOOLS};
