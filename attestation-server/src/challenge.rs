//! Challenges that cost no database write.
//!
//! A nonce is a token the pool can check on its own: when it expires, the
//! policy generation it was issued under, 8 random bytes, and a MAC over
//! those and the host's name under a key every server of the pool shares
//! (kept in the database, made by the first server to start). Issuing a
//! challenge is then pure computation; the one write is made when evidence
//! uses the nonce, in the same transaction as the verdict, and that row is
//! what makes a nonce single-use.
//!
//! Layout (32 bytes, what the TPM quotes as qualifying data; real TPMs
//! refuse more than a SHA-256 digest's size when SHA-256 is their largest
//! bank): expiry as u32 Unix seconds, generation as u32 (its low bits),
//! random, then HMAC-SHA256 truncated to 16 bytes. The MAC makes the nonce
//! unpredictable to anyone without the key and binds it to one host.

use chrono::{DateTime, TimeZone, Utc};
use ring::hmac;

/// Bytes in a nonce.
pub const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Names what the MAC is over, so the key could serve nothing else by mistake.
const CONTEXT: &[u8] = b"trusted-pool challenge v1\0";

/// The pool's challenge key.
pub struct ChallengeKey(hmac::Key);

impl std::fmt::Debug for ChallengeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChallengeKey(<redacted>)")
    }
}

/// What a genuine nonce says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub expires_at: DateTime<Utc>,
    /// The low 32 bits of the pool's policy generation at issue.
    pub generation: u32,
}

/// The low 32 bits a nonce carries of a policy generation.
pub fn generation_bits(generation: i64) -> u32 {
    generation as u32
}

impl ChallengeKey {
    pub fn new(secret: &[u8]) -> Self {
        ChallengeKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn tag(&self, host: &str, body: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(CONTEXT);
        // The name's length first: no two (host, body) pairs share an input.
        ctx.update(&(host.len() as u64).to_be_bytes());
        ctx.update(host.as_bytes());
        ctx.update(body);
        ctx.sign()
    }

    /// A nonce for `host`, expiring at `expires_at` (whole seconds).
    pub fn issue(
        &self,
        host: &str,
        expires_at: DateTime<Utc>,
        generation: i64,
        random: [u8; 8],
    ) -> [u8; NONCE_LEN] {
        let secs = u32::try_from(expires_at.timestamp().max(0)).unwrap_or(u32::MAX);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&secs.to_be_bytes());
        nonce[4..8].copy_from_slice(&generation_bits(generation).to_be_bytes());
        nonce[8..16].copy_from_slice(&random);
        let tag = self.tag(host, &nonce[..NONCE_LEN - TAG_LEN]);
        nonce[NONCE_LEN - TAG_LEN..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
        nonce
    }

    /// The claims of `nonce` (hex) if this pool issued it to `host`; `None`
    /// for anything else (malformed, forged, another pool's or host's).
    pub fn open(&self, host: &str, nonce: &str) -> Option<Claims> {
        let bytes = hex::decode(nonce).ok()?;
        if bytes.len() != NONCE_LEN {
            return None;
        }
        let (body, tag) = bytes.split_at(NONCE_LEN - TAG_LEN);
        let expected = self.tag(host, body);
        // Constant time: an early-exit comparison would leak the tag.
        if !crate::enroll::constant_time_eq(&expected.as_ref()[..TAG_LEN], tag) {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
        Some(Claims {
            expires_at: Utc.timestamp_opt(i64::from(word(0)), 0).single()?,
            generation: word(4),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().unwrap()
    }

    #[test]
    fn a_nonce_opens_for_its_host_under_its_key_only() {
        let key = ChallengeKey::new(&[7u8; 32]);
        let nonce = hex::encode(key.issue("node1", at(1_800_000_000), 41, [1; 8]));
        assert_eq!(
            key.open("node1", &nonce),
            Some(Claims {
                expires_at: at(1_800_000_000),
                generation: 41
            })
        );
        assert_eq!(key.open("node2", &nonce), None, "bound to its host");
        assert_eq!(ChallengeKey::new(&[8u8; 32]).open("node1", &nonce), None);
        // Upper-case hex is the same nonce.
        assert!(key.open("node1", &nonce.to_ascii_uppercase()).is_some());
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let key = ChallengeKey::new(b"secret");
        let nonce = key.issue("n", at(1_900_000_000), 3, [9; 8]);
        for i in 0..NONCE_LEN {
            let mut bad = nonce;
            bad[i] ^= 1;
            assert_eq!(key.open("n", &hex::encode(bad)), None, "byte {i}");
        }
    }

    #[test]
    fn malformed_nonces_are_refused_without_panic() {
        let key = ChallengeKey::new(b"secret");
        for bad in ["", "zz", "00", &"00".repeat(31), &"00".repeat(33), "é"] {
            assert_eq!(key.open("n", bad), None, "{bad:?}");
        }
    }

    #[test]
    fn random_bytes_make_distinct_nonces() {
        let key = ChallengeKey::new(b"secret");
        let a = key.issue("n", at(1_900_000_000), 3, [1; 8]);
        let b = key.issue("n", at(1_900_000_000), 3, [2; 8]);
        assert_ne!(a, b);
        assert_ne!(a[16..], b[16..], "the tags differ too");
    }

    #[test]
    fn generation_keeps_its_low_bits() {
        let key = ChallengeKey::new(b"secret");
        let g = (5_i64 << 32) + 12;
        let nonce = hex::encode(key.issue("n", at(1_900_000_000), g, [0; 8]));
        assert_eq!(
            key.open("n", &nonce).map(|c| c.generation),
            Some(generation_bits(g))
        );
        assert_eq!(generation_bits(g), 12);
    }

    #[test]
    fn debug_does_not_show_the_key() {
        assert_eq!(
            format!("{:?}", ChallengeKey::new(b"secret")),
            "ChallengeKey(<redacted>)"
        );
    }
}
