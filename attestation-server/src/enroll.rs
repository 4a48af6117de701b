//! Enrollment: a host proves that its attestation key lives in a genuine
//! TPM, and in the TPM of the host that claims it (docs/protocol.md).
//!
//! 1. `enroll`: the agent sends its EK certificate, EK and AK public areas.
//!    The server checks the EK certificate chain and that it certifies this
//!    EK, checks the AK's attributes, checks the host ↔ EK pin, and answers
//!    with a TPM2_MakeCredential credential for the AK, encrypted to the EK.
//! 2. `activate`: only a TPM holding both the EK and the AK recovers the
//!    secret (TPM2_ActivateCredential); the agent proves it with
//!    HMAC-SHA256(secret, host). Only then are the AK's quotes accepted.

use crate::api::{valid_host, Body, Caller};
use crate::audit;
use crate::credential;
use crate::ekcert;
use crate::error::Error;
use crate::store::{ActivateOutcome, Enrollment};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use proto::cadf::Resource;
use proto::tpm::{attr, Public};
use proto::wire::{ActivateRequest, ActivateResponse, EnrollRequest, EnrollResponse, HostDetail};
use rand::RngCore;
use std::sync::Arc;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The tag that marks an enrollment without an EK certificate in its events.
const NO_EK_CERT_TAG: &str = "ek_certificate?value=absent";

pub async fn enroll(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
    body: Result<Body<EnrollRequest>, Error>,
) -> Result<Json<EnrollResponse>, Error> {
    valid_host(&host)?;
    caller.require_agent_for(&host)?;
    let now = Utc::now();
    match begin(&st, &host, body, now).await {
        Ok(resp) => {
            st.audit_wake.notify_one();
            Ok(Json(resp))
        }
        Err(e) => Err(refused(&st, &host, "create", e, now).await),
    }
}

async fn begin(
    st: &AppState,
    host: &str,
    body: Result<Body<EnrollRequest>, Error>,
    now: DateTime<Utc>,
) -> Result<EnrollResponse, Error> {
    let Body(req) = body?;
    let ek_bytes = B64
        .decode(&req.ek_public)
        .map_err(|_| Error::BadEk("ek_public is not base64".into()))?;
    let ek = Public::decode(&ek_bytes).map_err(|e| Error::BadEk(e.to_string()))?;
    check_ek_attributes(&ek)?;
    let ak_bytes = B64
        .decode(&req.ak_public)
        .map_err(|_| Error::BadAk("ak_public is not base64".into()))?;
    let ak = Public::decode(&ak_bytes).map_err(|e| Error::BadAk(e.to_string()))?;
    check_ak_attributes(&ak)?;
    let ek_name = hex::encode(ek.name());
    let ak_name = ak.name();
    if let Some(claimed) = &req.ak_name {
        if !claimed.eq_ignore_ascii_case(&hex::encode(&ak_name)) {
            return Err(Error::AkNameMismatch {
                claimed: claimed.clone(),
                computed: hex::encode(&ak_name),
            });
        }
    }

    let ek_certified = match &req.ek_certificate {
        Some(c) => {
            let der = B64.decode(c).map_err(|_| {
                Error::EkCertificate(ekcert::EkCertError::Malformed {
                    detail: "ek_certificate is not base64".into(),
                })
            })?;
            let info = ekcert::verify_ek_certificate(&der, &ek, &st.ek_roots, now)?;
            tracing::info!(host, issuer = %info.issuer, "EK certificate verified");
            true
        }
        None if st
            .config
            .allow_without_ek_certificate
            .iter()
            .any(|h| h == host) =>
        {
            tracing::warn!(host, "enrolling a TPM without an EK certificate (allowed for this host by configuration)");
            false
        }
        None => {
            return Err(Error::EkCertificateRequired {
                host: host.to_string(),
            })
        }
    };

    // Identity pinning: one EK per host, one host per EK.
    if let Some(record) = st.store.host(host).await? {
        if let Some(pinned) = record.ek_name.filter(|p| *p != ek_name) {
            if !record.rekey_allowed {
                return Err(Error::EkConflict {
                    host: host.to_string(),
                    pinned,
                });
            }
        }
    }
    if let Some(other) = st.store.host_for_ek(&ek_name).await?.filter(|o| o != host) {
        return Err(Error::EkInUse { other_host: other });
    }

    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let cred = credential::make_credential(&ek, &ak_name, &secret, &mut rand::rngs::OsRng)?;
    let enrollment = Enrollment {
        id: uuid::Uuid::new_v4().to_string(),
        host: host.to_string(),
        ek_public: ek_bytes,
        ek_name,
        ek_certified,
        ak_public: ak_bytes,
        ak_name: hex::encode(&ak_name),
        proof: proof(&secret, host),
        created_at: now,
        expires_at: now + Duration::seconds(st.config.enrollment_ttl_secs as i64),
    };
    let mut event = audit::event(
        &st.config.name,
        audit::client("agent", host),
        Resource::host(host),
        "create",
        "pending",
        None,
        now,
        Some(host),
    );
    if !ek_certified {
        event = audit::with_tags(event, &[NO_EK_CERT_TAG]);
    }
    st.store.create_enrollment(&enrollment, &event).await?;
    Ok(EnrollResponse {
        enrollment_id: enrollment.id,
        credential_blob: B64.encode(&cred.id_object),
        encrypted_secret: B64.encode(&cred.encrypted_secret),
        expires_at: enrollment.expires_at,
    })
}

pub async fn activate(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
    body: Result<Body<ActivateRequest>, Error>,
) -> Result<Json<ActivateResponse>, Error> {
    valid_host(&host)?;
    caller.require_agent_for(&host)?;
    let now = Utc::now();
    match finish(&st, &host, body, now).await {
        Ok(resp) => {
            st.audit_wake.notify_one();
            Ok(Json(resp))
        }
        Err(e) => Err(refused(&st, &host, "authenticate", e, now).await),
    }
}

async fn finish(
    st: &AppState,
    host: &str,
    body: Result<Body<ActivateRequest>, Error>,
    now: DateTime<Utc>,
) -> Result<ActivateResponse, Error> {
    let Body(req) = body?;
    // Single use: taking the enrollment consumes it, right proof or not.
    let taken = st
        .store
        .take_enrollment(&req.enrollment_id, host, now)
        .await?
        .filter(|t| t.enrollment.host == host)
        .ok_or(Error::EnrollmentUnknown)?;
    if taken.used_before {
        return Err(Error::EnrollmentUsed);
    }
    let e = taken.enrollment;
    if now >= e.expires_at {
        return Err(Error::EnrollmentExpired {
            expired_at: e.expires_at,
        });
    }
    let given = req.proof.to_ascii_lowercase();
    if !constant_time_eq(given.as_bytes(), e.proof.as_bytes()) {
        return Err(Error::ActivationProofInvalid);
    }
    let mut event = audit::event(
        &st.config.name,
        audit::client("agent", host),
        Resource::host(host),
        "authenticate",
        "success",
        None,
        now,
        Some(host),
    );
    if !e.ek_certified {
        event = audit::with_tags(event, &[NO_EK_CERT_TAG]);
    }
    match st.store.activate(&e, &event).await? {
        ActivateOutcome::Activated => Ok(ActivateResponse {
            host: host.to_string(),
            ak_name: e.ak_name,
        }),
        ActivateOutcome::EkInUse { host: other } => Err(Error::EkInUse { other_host: other }),
    }
}

/// `POST /v1/hosts/{host}/rekey` (admin): let the host enroll once with another EK.
pub async fn rekey(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<HostDetail>, Error> {
    caller.require(&[crate::tls::Role::Admin], "approve re-keying hosts")?;
    valid_host(&host)?;
    let event = audit::event(
        &st.config.name,
        audit::client("admin", &caller.0.name),
        Resource::host(&host),
        "update",
        "success",
        Some(("identity", "rekey_approved")),
        Utc::now(),
        Some(&host),
    );
    if !st.store.allow_rekey(&host, &event).await? {
        return Err(Error::UnknownHost(host));
    }
    st.audit_wake.notify_one();
    crate::api::detail(&st, &host).await.map(Json)
}

/// Record a refused enrollment or activation as a failure event.
async fn refused(st: &AppState, host: &str, action: &str, e: Error, now: DateTime<Utc>) -> Error {
    if matches!(e, Error::Storage(_)) {
        return e;
    }
    tracing::warn!(host, code = e.code(), error = %e, "enrollment refused");
    let event = audit::event(
        &st.config.name,
        audit::client("agent", host),
        Resource::host(host),
        action,
        "failure",
        Some(("enrollment", e.code())),
        now,
        Some(host),
    );
    if let Err(store_err) = st.store.record_event(&event).await {
        return store_err.into();
    }
    st.audit_wake.notify_one();
    e
}

/// hex HMAC-SHA256 keyed by the credential secret over the host name.
pub fn proof(secret: &[u8], host: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    hex::encode(ring::hmac::sign(&key, host.as_bytes()).as_ref())
}

/// Equal, in time that does not depend on where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An EK is a restricted decryption key that never left its TPM.
fn check_ek_attributes(ek: &Public) -> Result<(), Error> {
    for (bit, name) in [
        (attr::FIXED_TPM, "fixedTPM"),
        (attr::FIXED_PARENT, "fixedParent"),
        (attr::RESTRICTED, "restricted"),
        (attr::DECRYPT, "decrypt"),
    ] {
        if !ek.has(bit) {
            return Err(Error::BadEk(format!("attribute {name} is not set")));
        }
    }
    if ek.has(attr::SIGN_ENCRYPT) {
        return Err(Error::BadEk(
            "an endorsement key must not be a signing key".into(),
        ));
    }
    Ok(())
}

/// An AK must be a restricted signing key that never left its TPM.
pub fn check_ak_attributes(ak: &Public) -> Result<(), Error> {
    for (bit, name) in [
        (attr::FIXED_TPM, "fixedTPM"),
        (attr::FIXED_PARENT, "fixedParent"),
        (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (attr::RESTRICTED, "restricted"),
        (attr::SIGN_ENCRYPT, "sign"),
    ] {
        if !ak.has(bit) {
            return Err(Error::BadAk(format!("attribute {name} is not set")));
        }
    }
    if ak.has(attr::DECRYPT) {
        return Err(Error::BadAk(
            "an attestation key must not be a decryption key".into(),
        ));
    }
    if matches!(ak.scheme, proto::tpm::KeyScheme::Other(_)) {
        return Err(Error::BadAk(
            "the key's signing scheme is not supported".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_is_hmac_sha256_of_the_host_name() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            proof(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
