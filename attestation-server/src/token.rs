//! Signed attestation results: `GET /v1/hosts/{host}/token` hands out a
//! short-lived ES256 JWT of a host's current verdict, and
//! `/.well-known/jwks.json` publishes the key that verifies it, so a
//! scheduler elsewhere can trust our verdicts offline. The same key signs
//! trust-change notifications (see `push`).

use crate::api::{current_trust, valid_host, Caller};
use crate::error::Error;
use crate::tls::Role;
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use chrono::Utc;
use proto::token::{self, Claims, Jwk, Jwks};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Serialize;
use std::path::Path as FsPath;
use std::sync::Arc;

/// The server's token signing key and its published JWK.
pub struct Signer {
    key: EcdsaKeyPair,
    jwk: Jwk,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.jwk.kid)
            .finish()
    }
}

impl Signer {
    /// Load a PKCS#8 PEM P-256 key (as written by `attestctl init`).
    pub fn load(path: &FsPath) -> Result<Self, Error> {
        let bad = |problem: String| Error::Config {
            key: "token_key".into(),
            problem: format!("{}: {problem}", path.display()),
        };
        let der = PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| bad(e.to_string()))?;
        Self::from_pkcs8(der.secret_pkcs8_der()).map_err(bad)
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
        let jwk = Jwk::from_p256_public(key.public_key().as_ref()).map_err(|e| e.to_string())?;
        Ok(Self { key, jwk })
    }

    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: vec![self.jwk.clone()],
        }
    }

    pub fn kid(&self) -> &str {
        &self.jwk.kid
    }

    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, Error> {
        Ok(token::sign_es256(&self.key, claims)?)
    }
}

/// A fresh PKCS#8 PEM P-256 signing key (for `attestctl init`).
pub fn generate_key_pem() -> Result<String, Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::TlsSetup(format!("token key generation: {e}")))?;
    Ok(key.serialize_pem())
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TokenResponse {
    pub token: String,
}

pub(crate) fn signer(st: &AppState) -> Result<&Signer, Error> {
    st.token.as_deref().ok_or(Error::TokenSigningDisabled)
}

/// `GET /v1/hosts/{host}/token`: the host's current verdict, signed.
pub async fn host_token(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<TokenResponse>, Error> {
    valid_host(&host)?;
    if caller.0.role == Role::Agent {
        caller.require_agent_for(&host)?;
    } else {
        caller.require(&[Role::Scheduler, Role::Admin], "fetch host tokens")?;
    }
    let signer = signer(&st)?;
    let mut found = st.store.verdicts(std::slice::from_ref(&host)).await?;
    let now = Utc::now();
    let v = current_trust(&host, found.remove(&host), now);
    let iat = now.timestamp();
    let ttl_end = iat.saturating_add(i64::try_from(st.config.token_ttl_secs).unwrap_or(i64::MAX));
    let expires_at = v.expires_at.map(|t| t.timestamp());
    // A token never outlives the verdict it carries; an expired verdict reads
    // `unknown`, which stays true for the token's short life.
    let exp = match expires_at {
        Some(e) if e > iat => e.min(ttl_end),
        _ => ttl_end,
    };
    let claims = Claims {
        iss: st.config.name.clone(),
        sub: host,
        trust: v.trust.as_str().to_string(),
        verified_at: v.verified_at.map(|t| t.timestamp()),
        expires_at,
        iat,
        exp,
        whitelist_version: v.policy.as_ref().map(|p| {
            p.whitelists
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }),
    };
    Ok(Json(TokenResponse {
        token: signer.sign(&claims)?,
    }))
}

/// `GET /.well-known/jwks.json`: the keys that verify our tokens (any role).
pub async fn jwks(State(st): State<Arc<AppState>>, _caller: Caller) -> Result<Json<Jwks>, Error> {
    Ok(Json(signer(&st)?.jwks()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_loads_and_signs_verifiable_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, generate_key_pem().unwrap()).unwrap();
        let s = Signer::load(&path).unwrap();
        let claims = serde_json::json!({"sub": "h", "exp": 10});
        let t = s.sign(&claims).unwrap();
        let back: serde_json::Value = token::verify_signed(&t, &s.jwks()).unwrap();
        assert_eq!(back, claims);
        assert_eq!(s.kid().len(), 22);
        std::fs::write(&path, "not a key").unwrap();
        assert!(
            matches!(Signer::load(&path), Err(Error::Config { key, .. }) if key == "token_key")
        );
    }
}
