//! The credential the server makes for our AK with TPM2_MakeCredential, as
//! it travels: each part is a marshalled TPM2B (u16 size, then the bytes),
//! while tss-esapi wants only the bytes.

use crate::error::Error;
use tss_esapi::structures::{EncryptedSecret, IdObject};

/// A credential ready for TPM2_ActivateCredential.
#[derive(Debug, Clone)]
pub(crate) struct Credential {
    pub id_object: IdObject,
    pub secret: EncryptedSecret,
}

/// Check the framing of both parts and convert them. `id_object` is the
/// marshalled TPM2B_ID_OBJECT, `encrypted_secret` the marshalled
/// TPM2B_ENCRYPTED_SECRET.
pub(crate) fn parse(id_object: &[u8], encrypted_secret: &[u8]) -> Result<Credential, Error> {
    let id_object = IdObject::try_from(tpm2b_content("credential_blob", id_object)?.to_vec())
        .map_err(|e| bad("credential_blob", format!("not a TPM2B_ID_OBJECT: {e}")))?;
    let secret =
        EncryptedSecret::try_from(tpm2b_content("encrypted_secret", encrypted_secret)?.to_vec())
            .map_err(|e| {
                bad(
                    "encrypted_secret",
                    format!("not a TPM2B_ENCRYPTED_SECRET: {e}"),
                )
            })?;
    Ok(Credential { id_object, secret })
}

/// The content of a marshalled TPM2B, which must be exactly as long as its
/// size field says and not empty (neither part of a credential can be).
fn tpm2b_content<'a>(field: &'static str, bytes: &'a [u8]) -> Result<&'a [u8], Error> {
    let Some((size, content)) = bytes.split_first_chunk::<2>() else {
        return Err(bad(field, "shorter than a TPM2B size field".into()));
    };
    let size = usize::from(u16::from_be_bytes(*size));
    if size != content.len() {
        return Err(bad(
            field,
            format!(
                "the TPM2B size field says {size} bytes, {} follow",
                content.len()
            ),
        ));
    }
    if content.is_empty() {
        return Err(bad(field, "empty".into()));
    }
    Ok(content)
}

fn bad(field: &'static str, problem: String) -> Error {
    Error::Enrollment { field, problem }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpm2b(content: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(content.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(content);
        out
    }

    #[test]
    fn size_prefix_is_stripped() {
        let credential = parse(&tpm2b(&[1; 68]), &tpm2b(&[2; 256])).unwrap();
        assert_eq!(credential.id_object.value(), &[1; 68]);
        assert_eq!(credential.secret.value(), &[2; 256]);
    }

    #[test]
    fn bad_framing_names_the_field() {
        let secret = tpm2b(&[2; 256]);
        for id_object in [vec![], vec![0], vec![0, 0], vec![0, 3, 1, 2], {
            let mut long = tpm2b(&[1; 68]);
            long.push(0);
            long
        }] {
            match parse(&id_object, &secret) {
                Err(Error::Enrollment { field, .. }) => assert_eq!(field, "credential_blob"),
                other => panic!("{id_object:?}: expected an enrollment error, got {other:?}"),
            }
        }
        match parse(&tpm2b(&[1; 68]), &secret[..100]) {
            Err(Error::Enrollment { field, .. }) => assert_eq!(field, "encrypted_secret"),
            other => panic!("expected an enrollment error, got {other:?}"),
        }
    }

    #[test]
    fn oversized_content_is_refused() {
        // TPM2B_ID_OBJECT holds at most sizeof(TPMS_ID_OBJECT) bytes.
        assert!(matches!(
            parse(&tpm2b(&[1; 4000]), &tpm2b(&[2; 256])),
            Err(Error::Enrollment {
                field: "credential_blob",
                ..
            })
        ));
    }
}
