//! Offline verification of the server's signed results: host-trust tokens
//! (`GET /v1/hosts/{host}/token`) and pushed trust-change notifications.
//!
//! The key set is fetched once from `/.well-known/jwks.json` and then reused;
//! a token signed with a key we do not hold triggers one refetch (the server
//! may have rotated), at most once per [`REFRESH_INTERVAL`] so forged kids
//! cannot turn the verifier into a request amplifier.

use crate::error::Error;
use chrono::Utc;
use proto::client::ApiClient;
use proto::token::{self, Claims, Jwks, TokenError, TrustChange};
use proto::wire::valid_host_name;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the server publishes its verification keys.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Least time between two refetches caused by unknown key ids.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// The server's key set, held in memory, refreshed from the server (if one
/// is configured) when a token names an unknown key.
pub struct TokenVerifier {
    source: Option<ApiClient>,
    state: Mutex<KeyState>,
}

struct KeyState {
    keys: Option<Jwks>,
    fetched_at: Option<Instant>,
}

impl TokenVerifier {
    /// Keys from the server at the first use, refreshed on unknown kids.
    pub fn from_server(client: ApiClient) -> Self {
        Self {
            source: Some(client),
            state: Mutex::new(KeyState {
                keys: None,
                fetched_at: None,
            }),
        }
    }

    /// A fixed key set (e.g. a JWKS file copied to another cloud).
    pub fn from_jwks(keys: Jwks) -> Self {
        Self {
            source: None,
            state: Mutex::new(KeyState {
                keys: Some(keys),
                fetched_at: None,
            }),
        }
    }

    /// A host-trust token: signature by one of the server's keys, not
    /// expired, and about a valid host name.
    pub async fn verify_token(&self, token: &str) -> Result<Claims, Error> {
        let claims = self
            .with_keys(|keys| token::verify_es256(token, keys, Utc::now().timestamp()))
            .await?;
        if !valid_host_name(&claims.sub) {
            return Err(Error::Token {
                source: TokenError::Malformed(format!("invalid host name {:?}", claims.sub)),
            });
        }
        Ok(claims)
    }

    /// A pushed notification: signature by one of the server's keys, the
    /// `trust_changed` event, and a valid host name. Notifications carry no
    /// expiry; replaying one only makes the cache ask the server again.
    pub async fn verify_notification(&self, token: &str) -> Result<TrustChange, Error> {
        let change: TrustChange = self
            .with_keys(|keys| token::verify_signed(token, keys))
            .await?;
        if change.event != token::TRUST_CHANGED {
            return Err(Error::Token {
                source: TokenError::Malformed(format!("unexpected event {:?}", change.event)),
            });
        }
        if !valid_host_name(&change.sub) {
            return Err(Error::Token {
                source: TokenError::Malformed(format!("invalid host name {:?}", change.sub)),
            });
        }
        Ok(change)
    }

    /// Run `check` against the keys, fetching them first if none are held
    /// and once more if the token names a key we do not have.
    async fn with_keys<T>(
        &self,
        check: impl Fn(&Jwks) -> Result<T, TokenError>,
    ) -> Result<T, Error> {
        let held = self.lock().keys.clone();
        let keys = match held {
            Some(k) => k,
            None => self.refresh().await?,
        };
        match check(&keys) {
            Err(TokenError::UnknownKid { kid }) if self.may_refresh() => {
                tracing::info!(%kid, "token signed with an unknown key; refetching the key set");
                let keys = self.refresh().await?;
                check(&keys).map_err(|source| Error::Token { source })
            }
            other => other.map_err(|source| Error::Token { source }),
        }
    }

    fn may_refresh(&self) -> bool {
        self.source.is_some()
            && self
                .lock()
                .fetched_at
                .is_none_or(|t| t.elapsed() >= REFRESH_INTERVAL)
    }

    async fn refresh(&self) -> Result<Jwks, Error> {
        let Some(client) = &self.source else {
            return Err(Error::Token {
                source: TokenError::Malformed("no key set to verify with".into()),
            });
        };
        let keys: Jwks = client.get(JWKS_PATH).await.map_err(|source| Error::Jwks {
            server_url: client.base_url().to_string(),
            source,
        })?;
        let mut state = self.lock();
        state.keys = Some(keys.clone());
        state.fetched_at = Some(Instant::now());
        Ok(keys)
    }

    /// A panic while holding the lock cannot leave the key set half written.
    fn lock(&self) -> MutexGuard<'_, KeyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::token::{sign_es256, Jwk};
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

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

    fn change(event: &str, sub: &str) -> TrustChange {
        TrustChange {
            iss: "srv".into(),
            sub: sub.into(),
            event: event.into(),
            from: "trusted".into(),
            to: "untrusted".into(),
            at: 1,
            jti: "id".into(),
        }
    }

    #[tokio::test]
    async fn notifications_need_our_key_the_event_and_a_host_name() {
        let k = key();
        let v = TokenVerifier::from_jwks(jwks(&k));
        let ok = sign_es256(&k, &change("trust_changed", "node1")).unwrap();
        assert_eq!(v.verify_notification(&ok).await.unwrap().sub, "node1");

        let other = sign_es256(&key(), &change("trust_changed", "node1")).unwrap();
        assert!(matches!(
            v.verify_notification(&other).await,
            Err(Error::Token {
                source: TokenError::UnknownKid { .. }
            })
        ));
        let wrong_event = sign_es256(&k, &change("hello", "node1")).unwrap();
        let e = v.verify_notification(&wrong_event).await.unwrap_err();
        assert!(e.to_string().contains("hello"), "{e}");
        let bad_host = sign_es256(&k, &change("trust_changed", "../x")).unwrap();
        assert!(v.verify_notification(&bad_host).await.is_err());
    }
}
