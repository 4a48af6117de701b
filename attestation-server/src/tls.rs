//! Mutual TLS: the server's rustls configuration, and the client identity
//! (role and name) read from a verified client certificate.
//!
//! A client certificate's subject carries its role in the organizational
//! unit (`OU=agent`, `OU=scheduler`, `OU=admin`, `OU=auditor`) and its identity in the
//! common name; an agent's common name is its host name.

use crate::config::ServerTls;
use crate::error::Error;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Scheduler,
    Admin,
    /// May only read audit events and the audit status.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Scheduler => "scheduler",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

/// Who is calling, as proven by their certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub role: Role,
    pub name: String,
}

/// The identity of a TLS connection: absent when no certificate was shown,
/// an error message when the certificate chains but is unusable.
pub type Peer = Option<Result<ClientIdentity, String>>;

pub fn server_config(tls: &ServerTls) -> Result<rustls::ServerConfig, Error> {
    let err = |what: &str, e: &dyn std::fmt::Display| Error::TlsSetup(format!("{what}: {e}"));
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| err(&format!("cannot read {}", tls.cert.display()), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&format!("bad certificate in {}", tls.cert.display()), &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| err(&format!("cannot read key {}", tls.key.display()), &e))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&tls.client_ca)
        .map_err(|e| err(&format!("cannot read {}", tls.client_ca.display()), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            err(
                &format!("bad certificate in {}", tls.client_ca.display()),
                &e,
            )
        })?;
    for ca in cas {
        roots.add(ca).map_err(|e| err("bad client CA", &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // A connection without a certificate is let through the handshake so that
    // it receives a clear HTTP 401; a certificate that is shown must chain to
    // the client CA or the handshake fails.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| err("client verifier", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("server certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Stateless TLS 1.3 session tickets (keys rotated every 6 hours, kept in
    // memory only): an agent that reconnects resumes without a full
    // handshake, whatever the pool's size; a stateful cache would have to
    // hold every host. A resumed session keeps the client certificate it
    // was made with, so roles and identities are unchanged.
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| err("session ticketer", &e))?;
    // One ticket per handshake, not rustls's default two: an agent holds
    // one connection at a time and gets a fresh ticket on every resumption,
    // and each ticket costs a key derivation and the encryption of the
    // session with its client certificate (docs/benchmarks.md).
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// Read role and name from a verified client certificate.
pub fn identity(cert: &CertificateDer<'_>) -> Result<ClientIdentity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let subject = parsed.subject();
    let name = exactly_one(subject.iter_common_name(), "common name (CN)")?;
    let ou = exactly_one(
        subject.iter_organizational_unit(),
        "organizational unit (OU)",
    )?;
    let role = match ou.as_str() {
        "agent" => Role::Agent,
        "scheduler" => Role::Scheduler,
        "admin" => Role::Admin,
        "auditor" => Role::Auditor,
        other => return Err(format!("unknown role OU={other:?}")),
    };
    if !proto::wire::valid_host_name(&name) {
        return Err(format!("common name {name:?} is not a valid name"));
    }
    Ok(ClientIdentity { role, name })
}

fn exactly_one<'a>(
    mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
    what: &str,
) -> Result<String, String> {
    let first = it.next().ok_or_else(|| format!("subject has no {what}"))?;
    if it.next().is_some() {
        return Err(format!("subject has more than one {what}"));
    }
    first
        .as_str()
        .map(str::to_string)
        .map_err(|_| format!("subject {what} is not a string"))
}
