//! Mutual TLS: the server's rustls configuration, and the client identity
//! (role and name) read from a verified client certificate.
//!
//! A client certificate's subject carries its role in the organizational
//! unit (`OU=agent`, `OU=scheduler`, `OU=admin`, `OU=auditor`) and its identity in the
//! common name; an agent's common name is its host name.

use crate::config::{ServerTls, TlsSuite};
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
    let provider = Arc::new(provider(&tls.cipher_suites));
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
    // The server's preference decides (see `provider`), not the client's.
    config.ignore_client_order = true;
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

/// ring's TLS 1.3 suites, only `suites` and in their order (see
/// [`TlsSuite::DEFAULT_ORDER`] for why AES-128-GCM comes first by default;
/// rustls's own order puts AES-256-GCM-SHA384 first).
fn provider(suites: &[TlsSuite]) -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite as ring_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = suites
        .iter()
        .map(|s| match s {
            TlsSuite::Aes128GcmSha256 => ring_suite::TLS13_AES_128_GCM_SHA256,
            TlsSuite::Aes256GcmSha384 => ring_suite::TLS13_AES_256_GCM_SHA384,
            TlsSuite::Chacha20Poly1305Sha256 => ring_suite::TLS13_CHACHA20_POLY1305_SHA256,
        })
        .collect();
    p
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use rustls::CipherSuite;

    /// The suite a handshake between a server configured with `server` and
    /// a client offering `offered` (in that order) settles on; `None` when
    /// the handshake fails.
    fn negotiated(server: &[TlsSuite], offered: &[TlsSuite]) -> Option<CipherSuite> {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_pem) = Ca::new("suite test CA").unwrap();
        ca.issue_server("localhost")
            .unwrap()
            .write(dir.path(), "server")
            .unwrap();
        let client = ca.issue_client("agent", "node1").unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        let server = server_config(&ServerTls {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
            cipher_suites: server.to_vec(),
        })
        .unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        // The client offers `offered` in its order, through the same mapping.
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider(offered)))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        // Shuttle records between the two in memory until both are done.
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().ok()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().ok()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return s.negotiated_cipher_suite().map(|s| s.suite());
            }
        }
        None
    }

    #[test]
    fn the_servers_suite_order_decides() {
        use CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
        use TlsSuite::{Aes128GcmSha256, Aes256GcmSha384, Chacha20Poly1305Sha256};
        let defaults = TlsSuite::DEFAULT_ORDER;
        // rustls's own client order, AES-256 first.
        let client = [Aes256GcmSha384, Aes128GcmSha256, Chacha20Poly1305Sha256];
        assert_eq!(
            negotiated(&defaults, &client),
            Some(TLS13_AES_128_GCM_SHA256)
        );
        // A client that will not take AES-128 still connects.
        assert_eq!(
            negotiated(&defaults, &[Aes256GcmSha384]),
            Some(TLS13_AES_256_GCM_SHA384)
        );
        assert_eq!(
            negotiated(&defaults, &[Chacha20Poly1305Sha256, Aes256GcmSha384]),
            Some(TLS13_AES_256_GCM_SHA384)
        );
        // An operator who requires AES-256 gets only AES-256.
        let strict = [Aes256GcmSha384];
        assert_eq!(negotiated(&strict, &client), Some(TLS13_AES_256_GCM_SHA384));
        assert_eq!(negotiated(&strict, &[Aes128GcmSha256]), None);
    }
}
