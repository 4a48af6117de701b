//! A development PKI for `attestctl init`: one CA, a server certificate for
//! loopback, and one client certificate per identity with its role in the
//! subject's OU. Production operators bring their own CA (see docs/operations.md).

use crate::error::Error;
use chrono::{Datelike, Utc};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::path::Path;

/// An issuing CA held in memory while `init` runs.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// A certificate and its private key, PEM encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn pki_err(e: rcgen::Error) -> Error {
    Error::TlsSetup(format!("certificate generation: {e}"))
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = Utc::now();
    params.not_before = rcgen::date_time_ymd(now.year(), now.month() as u8, now.day() as u8)
        - std::time::Duration::from_secs(86_400);
    params.not_after = rcgen::date_time_ymd(
        now.year() + years,
        now.month() as u8,
        now.day().min(28) as u8,
    );
}

impl Ca {
    pub fn new(common_name: &str) -> Result<(Self, String), Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "trusted compute pool");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 10);
        let cert = params.self_signed(&key).map_err(pki_err)?;
        let pem = cert.pem();
        Ok((Self { cert, key }, pem))
    }

    /// The server's certificate, valid for localhost and 127.0.0.1.
    pub fn issue_server(&self, common_name: &str) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(pki_err)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: `role` in the OU, `name` in the CN.
    pub fn issue_client(&self, role: &str, name: &str) -> Result<Issued, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<Issued, Error> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 1);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(pki_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Write a file; private keys get mode 0600.
pub fn write(path: &Path, contents: &str, private: bool) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

impl Issued {
    /// Write `DIR/NAME.pem` and `DIR/NAME.key`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), Error> {
        write(&dir.join(format!("{name}.pem")), &self.cert_pem, false)?;
        write(&dir.join(format!("{name}.key")), &self.key_pem, true)
    }
}
