//! The enrollment protocol's pure parts: which server refusals call for a
//! new enrollment, decoding the credential the server sends, and the proof
//! that the TPM released the credential's secret.

use crate::error::Error;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use proto::wire::EnrollResponse;
use sha2::Sha256;

/// The server does not know the AK that signed the evidence.
pub const AK_NOT_ENROLLED: &str = "ak_not_enrolled";
/// The server knows the AK but its credential was never activated.
pub const AK_NOT_ACTIVATED: &str = "ak_not_activated";
/// The enrollment's credential was activated too late.
pub const ENROLLMENT_EXPIRED: &str = "enrollment_expired";
/// The server has no such enrollment (restarted, or superseded).
pub const ENROLLMENT_UNKNOWN: &str = "enrollment_unknown";

/// Whether a server error code means "enroll again, then retry".
pub fn requires_enrollment(code: &str) -> bool {
    [
        AK_NOT_ENROLLED,
        AK_NOT_ACTIVATED,
        ENROLLMENT_EXPIRED,
        ENROLLMENT_UNKNOWN,
    ]
    .contains(&code)
}

/// The credential parts of an enroll answer, base64-decoded: the marshalled
/// TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.
pub fn decode_credential(offer: &EnrollResponse) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let decode = |field: &'static str, value: &str| {
        BASE64.decode(value).map_err(|e| Error::Enrollment {
            field,
            problem: format!("not base64: {e}"),
        })
    };
    Ok((
        decode("credential_blob", &offer.credential_blob)?,
        decode("encrypted_secret", &offer.encrypted_secret)?,
    ))
}

/// hex(HMAC-SHA256(key = secret, message = host name)): shows the server
/// that this TPM recovered the secret, bound to the host asking.
pub fn activation_proof(secret: &[u8], host: &str) -> Result<String, Error> {
    // HMAC accepts keys of any length; the error exists for other MACs.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| Error::Enrollment {
        field: "encrypted_secret",
        problem: format!("the recovered secret cannot key HMAC-SHA256: {e}"),
    })?;
    mac.update(host.as_bytes());
    Ok(hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn proof_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe".
        assert_eq!(
            activation_proof(b"Jefe", "what do ya want for nothing?").unwrap(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Bound to the secret and to the host.
        let proof = activation_proof(&[7; 32], "node1").unwrap();
        assert_eq!(proof.len(), 64);
        assert_ne!(proof, activation_proof(&[8; 32], "node1").unwrap());
        assert_ne!(proof, activation_proof(&[7; 32], "node2").unwrap());
    }

    #[test]
    fn enrollment_codes_are_recognised() {
        for code in [
            "ak_not_enrolled",
            "ak_not_activated",
            "enrollment_expired",
            "enrollment_unknown",
        ] {
            assert!(requires_enrollment(code), "{code}");
        }
        for code in [
            "pcr_not_whitelisted",
            "nonce_unknown",
            "",
            "AK_NOT_ENROLLED",
        ] {
            assert!(!requires_enrollment(code), "{code}");
        }
    }

    fn offer(credential_blob: &str, encrypted_secret: &str) -> EnrollResponse {
        EnrollResponse {
            enrollment_id: "e1".into(),
            credential_blob: credential_blob.into(),
            encrypted_secret: encrypted_secret.into(),
            expires_at: Utc::now(),
        }
    }

    #[test]
    fn credential_is_base64_decoded_and_bad_base64_names_the_field() {
        let (blob, secret) = decode_credential(&offer(
            &BASE64.encode([0, 1, 9]),
            &BASE64.encode([0, 2, 7, 7]),
        ))
        .unwrap();
        assert_eq!((blob, secret), (vec![0, 1, 9], vec![0, 2, 7, 7]));
        match decode_credential(&offer("%%", "AAA=")) {
            Err(Error::Enrollment { field, .. }) => assert_eq!(field, "credential_blob"),
            other => panic!("expected an enrollment error, got {other:?}"),
        }
        match decode_credential(&offer("AAA=", "not base64!")) {
            Err(Error::Enrollment { field, .. }) => assert_eq!(field, "encrypted_secret"),
            other => panic!("expected an enrollment error, got {other:?}"),
        }
    }
}
