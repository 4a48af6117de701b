//! Signed attestation results: compact ES256 JWTs and the JWK set that
//! verifies them. The server signs host-trust tokens and trust-change
//! notifications; schedulers verify both offline with [`verify_es256`] /
//! [`verify_signed`] and the keys published at `/.well-known/jwks.json`.
//!
//! One implementation on both sides, so the encoding cannot drift.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only algorithm we sign or accept.
pub const ALG: &str = "ES256";
/// `event` claim of a trust-change notification.
pub const TRUST_CHANGED: &str = "trust_changed";
/// Content type of a pushed notification body (the JWT itself).
pub const JWT_CONTENT_TYPE: &str = "application/jwt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("no key with kid {kid:?} in the key set")]
    UnknownKid { kid: String },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {alg:?} is not ES256")]
    WrongAlg { alg: String },
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// JOSE header of our tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
}

/// Claims of a host-trust token (`GET /v1/hosts/{host}/token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The signing server's name.
    pub iss: String,
    /// The host the verdict is about.
    pub sub: String,
    /// `trusted`, `untrusted` or `unknown`.
    pub trust: String,
    /// Unix seconds of the evidence behind the verdict.
    pub verified_at: Option<i64>,
    /// Unix seconds when the verdict itself expires.
    pub expires_at: Option<i64>,
    pub iat: i64,
    /// Never later than `expires_at`.
    pub exp: i64,
    /// The whitelist versions the verdict was judged against, `name@version` comma-separated.
    pub whitelist_version: Option<String>,
}

/// Claims of a trust-change notification pushed to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustChange {
    pub iss: String,
    /// The host whose effective trust changed.
    pub sub: String,
    /// Always [`TRUST_CHANGED`].
    pub event: String,
    pub from: String,
    pub to: String,
    /// Unix seconds of the change.
    pub at: i64,
    /// Unique id (a UUID), for de-duplicating retried deliveries.
    pub jti: String,
}

/// One public key, as published in the JWK set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(s: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| TokenError::Malformed(format!("base64url: {e}")))
}

/// Key id of a P-256 public key (uncompressed SEC1 point): base64url of the
/// first 16 bytes of its SHA-256.
pub fn kid_for(public_key: &[u8]) -> String {
    b64url(&Sha256::digest(public_key)[..16])
}

impl Jwk {
    /// The JWK of an uncompressed SEC1 P-256 point (`04 || x || y`).
    pub fn from_p256_public(public_key: &[u8]) -> Result<Jwk, TokenError> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(TokenError::Malformed(
                "P-256 public key must be a 65-byte uncompressed point".into(),
            ));
        }
        Ok(Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: b64url(&public_key[1..33]),
            y: b64url(&public_key[33..65]),
            kid: kid_for(public_key),
            alg: ALG.into(),
            use_: "sig".into(),
        })
    }

    /// The uncompressed SEC1 point again.
    fn point(&self) -> Result<Vec<u8>, TokenError> {
        if self.kty != "EC" || self.crv != "P-256" {
            return Err(TokenError::WrongAlg {
                alg: format!("{}/{}", self.kty, self.crv),
            });
        }
        let (x, y) = (b64url_decode(&self.x)?, b64url_decode(&self.y)?);
        if x.len() != 32 || y.len() != 32 {
            return Err(TokenError::Malformed(
                "JWK coordinates must be 32 bytes".into(),
            ));
        }
        let mut p = Vec::with_capacity(65);
        p.push(4);
        p.extend_from_slice(&x);
        p.extend_from_slice(&y);
        Ok(p)
    }
}

/// Sign `claims` as a compact JWT with an ECDSA P-256 key made for
/// `ECDSA_P256_SHA256_FIXED_SIGNING`; the kid is derived from its public key.
pub fn sign_es256<T: Serialize>(key: &EcdsaKeyPair, claims: &T) -> Result<String, TokenError> {
    let header = Header {
        alg: ALG.into(),
        typ: Some("JWT".into()),
        kid: Some(kid_for(key.public_key().as_ref())),
    };
    let signing_input = format!("{}.{}", json_b64(&header)?, json_b64(claims)?);
    let sig = key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .map_err(|_| TokenError::Signing("ECDSA signing failed".into()))?;
    Ok(format!("{signing_input}.{}", b64url(sig.as_ref())))
}

/// Check the algorithm, key and signature of a token and decode its claims,
/// without any time check (notifications carry no `exp`).
pub fn verify_signed<T: DeserializeOwned>(token: &str, jwks: &Jwks) -> Result<T, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let header: Header = serde_json::from_slice(&b64url_decode(h)?)
        .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    if header.alg != ALG {
        return Err(TokenError::WrongAlg { alg: header.alg });
    }
    let kid = header.kid.unwrap_or_default();
    let jwk = jwks
        .keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or(TokenError::UnknownKid { kid })?;
    if jwk.alg != ALG {
        return Err(TokenError::WrongAlg {
            alg: jwk.alg.clone(),
        });
    }
    let sig = b64url_decode(s)?;
    let signing_input_len = h.len() + 1 + p.len();
    let signing_input = token
        .get(..signing_input_len)
        .ok_or_else(|| TokenError::Malformed("truncated".into()))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, jwk.point()?)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature)?;
    serde_json::from_slice(&b64url_decode(p)?)
        .map_err(|e| TokenError::Malformed(format!("claims: {e}")))
}

/// Verify a host-trust token offline: signature by a key of `jwks`, and
/// `exp` after `now` (Unix seconds).
pub fn verify_es256(token: &str, jwks: &Jwks, now: i64) -> Result<Claims, TokenError> {
    let claims: Claims = verify_signed(token, jwks)?;
    if claims.exp <= now {
        return Err(TokenError::Expired {
            exp: claims.exp,
            now,
        });
    }
    Ok(claims)
}

/// Verify a pushed trust-change notification (signature and `event`).
/// It carries no `exp`: receivers judge freshness by `at` and de-duplicate
/// retried deliveries by `jti`; deliveries may arrive out of order.
pub fn verify_trust_change(token: &str, jwks: &Jwks) -> Result<TrustChange, TokenError> {
    let change: TrustChange = verify_signed(token, jwks)?;
    if change.event != TRUST_CHANGED {
        return Err(TokenError::Malformed(format!(
            "event {:?} is not {TRUST_CHANGED}",
            change.event
        )));
    }
    Ok(change)
}

fn json_b64<T: Serialize + ?Sized>(v: &T) -> Result<String, TokenError> {
    let json = serde_json::to_string(v).map_err(|e| TokenError::Signing(e.to_string()))?;
    Ok(b64url(json.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;

    fn key() -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
    }

    fn jwks(k: &EcdsaKeyPair) -> Jwks {
        Jwks {
            keys: vec![Jwk::from_p256_public(k.public_key().as_ref()).unwrap()],
        }
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "srv".into(),
            sub: "node1".into(),
            trust: "trusted".into(),
            verified_at: Some(100),
            expires_at: Some(exp),
            iat: 100,
            exp,
            whitelist_version: None,
        }
    }

    #[test]
    fn signed_token_verifies_and_round_trips() {
        let k = key();
        let t = sign_es256(&k, &claims(200)).unwrap();
        assert_eq!(verify_es256(&t, &jwks(&k), 150).unwrap(), claims(200));
        let header: serde_json::Value =
            serde_json::from_slice(&b64url_decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], jwks(&k).keys[0].kid.as_str());
    }

    #[test]
    fn expired_altered_and_foreign_tokens_are_refused() {
        let k = key();
        let t = sign_es256(&k, &claims(200)).unwrap();
        assert_eq!(
            verify_es256(&t, &jwks(&k), 200),
            Err(TokenError::Expired { exp: 200, now: 200 })
        );
        // Altered claim, original signature.
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(200);
        c.trust = "untrusted".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url(serde_json::to_string(&c).unwrap().as_bytes()),
            parts[2]
        );
        assert_eq!(
            verify_es256(&forged, &jwks(&k), 150),
            Err(TokenError::BadSignature)
        );
        // Another key under the same kid.
        let other = key();
        let mut set = jwks(&other);
        set.keys[0].kid = jwks(&k).keys[0].kid.clone();
        assert_eq!(verify_es256(&t, &set, 150), Err(TokenError::BadSignature));
        assert!(matches!(
            verify_es256(&t, &jwks(&other), 150),
            Err(TokenError::UnknownKid { .. })
        ));
        // alg none is refused before any key lookup.
        let none = format!("{}.{}.", b64url(br#"{"alg":"none"}"#), parts[1]);
        assert!(matches!(
            verify_es256(&none, &jwks(&k), 150),
            Err(TokenError::WrongAlg { .. })
        ));
        assert!(matches!(
            verify_es256("a.b", &jwks(&k), 150),
            Err(TokenError::Malformed(_))
        ));
    }
}
