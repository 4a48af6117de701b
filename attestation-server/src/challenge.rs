//! Challenges that cost no database write.
//!
//! A nonce is a token the pool can check on its own: when it expires, a
//! digest of the PCR selection it asks for, 8 random bytes, and a MAC over
//! those and the host's name under a key every server of the pool shares
//! (kept in the database, made by the first server to start). Issuing a
//! challenge is then pure computation; the one write is made when evidence
//! uses the nonce, in the same transaction as the verdict, and that row is
//! what makes a nonce single-use.
//!
//! Layout (32 bytes, what the TPM quotes as qualifying data; real TPMs
//! refuse more than a SHA-256 digest's size when SHA-256 is their largest
//! bank): expiry as u32 Unix seconds, the first 4 bytes of SHA-256 over
//! the selection, random, then HMAC-SHA256 truncated to 16 bytes. The MAC
//! makes the nonce unpredictable to anyone without the key and binds it to
//! one host and one selection. The selection itself is not carried: the
//! server that receives the evidence works out what it would ask for now
//! and, if the digest matches, holds the quote to exactly that.

use chrono::{DateTime, TimeZone, Utc};
use proto::tpm::PcrSelection;
use ring::hmac;
use sha2::{Digest, Sha256};

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
    selection: [u8; 4],
}

impl Claims {
    /// Whether the challenge asked for `selection` (a policy or
    /// configuration change since may have changed what is asked for).
    pub fn asked_for(&self, selection: &PcrSelection) -> bool {
        self.selection == selection_digest(selection)
    }
}

/// The first bytes of SHA-256 over the selection's canonical form (banks
/// in algorithm order, each with its PCR indices ascending).
fn selection_digest(selection: &PcrSelection) -> [u8; 4] {
    let mut h = Sha256::new();
    for (alg, pcrs) in selection.normalized() {
        h.update(alg.tpm_id().to_be_bytes());
        h.update([pcrs.len() as u8]);
        h.update(pcrs.iter().copied().collect::<Vec<u8>>());
    }
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
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

    /// A nonce for `host` asking for `selection`, expiring at `expires_at`
    /// (whole seconds).
    pub fn issue(
        &self,
        host: &str,
        expires_at: DateTime<Utc>,
        selection: &PcrSelection,
        random: [u8; 8],
    ) -> [u8; NONCE_LEN] {
        let secs = u32::try_from(expires_at.timestamp().max(0)).unwrap_or(u32::MAX);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&secs.to_be_bytes());
        nonce[4..8].copy_from_slice(&selection_digest(selection));
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
        let secs = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        Some(Claims {
            expires_at: Utc.timestamp_opt(i64::from(secs), 0).single()?,
            selection: [body[4], body[5], body[6], body[7]],
        })
    }
}

/// The keys a server issues and opens nonces with: the pool's current key
/// and, after a rotation, the one before it, whose nonces stay valid until
/// they expire (`attestctl challenge-key rotate`).
#[derive(Debug)]
pub struct KeyRing {
    pub generation: i64,
    current: ChallengeKey,
    /// The previous key, and the latest expiry a nonce it issued can have:
    /// one challenge TTL after the rotation. Whoever holds a leaked key can
    /// put any expiry in the nonces they mint; this bounds them.
    previous: Option<(ChallengeKey, DateTime<Utc>)>,
}

impl KeyRing {
    /// `ttl`: how long this server's challenges are valid.
    pub fn new(keys: &crate::store::ChallengeKeys, ttl: chrono::Duration) -> Self {
        let previous = match (&keys.previous, keys.rotated_at) {
            (Some(key), Some(at)) => Some((ChallengeKey::new(key), at + ttl)),
            _ => None,
        };
        KeyRing {
            generation: keys.generation,
            current: ChallengeKey::new(&keys.current),
            previous,
        }
    }

    /// See [`ChallengeKey::issue`]; always under the current key.
    pub fn issue(
        &self,
        host: &str,
        expires_at: DateTime<Utc>,
        selection: &PcrSelection,
        random: [u8; 8],
    ) -> [u8; NONCE_LEN] {
        self.current.issue(host, expires_at, selection, random)
    }

    /// See [`ChallengeKey::open`]: under the current key, else under the
    /// previous one if it could have issued the nonce before the rotation.
    pub fn open(&self, host: &str, nonce: &str) -> Option<Claims> {
        self.current.open(host, nonce).or_else(|| {
            let (key, latest_expiry) = self.previous.as_ref()?;
            key.open(host, nonce)
                .filter(|c| c.expires_at <= *latest_expiry)
        })
    }
}

/// The newest [`KeyRing`] this server has loaded, shared by its requests.
#[derive(Debug)]
pub struct PoolKeys(std::sync::RwLock<std::sync::Arc<KeyRing>>);

impl PoolKeys {
    pub fn new(ring: KeyRing) -> Self {
        PoolKeys(std::sync::RwLock::new(std::sync::Arc::new(ring)))
    }

    pub fn get(&self) -> std::sync::Arc<KeyRing> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Keep `ring` unless a newer generation is held already (two requests
    /// may load keys at once, in either order).
    pub fn offer(&self, ring: std::sync::Arc<KeyRing>) {
        let mut held = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ring.generation > held.generation {
            *held = ring;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::tpm::HashAlg;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().unwrap()
    }

    fn sel(pcrs: &[u8]) -> PcrSelection {
        let map = [(HashAlg::Sha256, pcrs.to_vec())].into_iter().collect();
        proto::wire::selection_from_map(&map)
    }

    /// Rotated at 900 s, with a 100 s challenge TTL.
    fn ring(generation: i64, current: u8, previous: Option<u8>) -> KeyRing {
        KeyRing::new(
            &crate::store::ChallengeKeys {
                generation,
                current: vec![current; 32],
                previous: previous.map(|p| vec![p; 32]),
                rotated_at: previous.map(|_| at(900)),
            },
            chrono::Duration::seconds(100),
        )
    }

    #[test]
    fn after_a_rotation_the_previous_keys_nonces_still_open_and_older_ones_do_not() {
        let nonce = |r: &KeyRing| hex::encode(r.issue("h1", at(1_000), &sel(&[0, 7]), [5; 8]));
        let first = ring(1, 1, None);
        let second = ring(2, 2, Some(1));
        let third = ring(3, 3, Some(2));
        let issued_first = nonce(&first);
        let issued_second = nonce(&second);
        assert_ne!(issued_first, issued_second, "issued under the current key");
        assert_eq!(
            second.open("h1", &issued_first).map(|c| c.expires_at),
            Some(at(1_000))
        );
        assert!(second.open("h1", &issued_second).is_some());
        assert!(
            second.open("h2", &issued_first).is_none(),
            "still bound to its host"
        );
        assert!(third.open("h1", &issued_second).is_some());
        assert!(
            third.open("h1", &issued_first).is_none(),
            "two rotations back: refused"
        );
        // A nonce the previous key "issued" with an expiry later than the
        // rotation could have given it was minted with a leaked key.
        let minted = hex::encode(first.issue("h1", at(1_001), &sel(&[0, 7]), [5; 8]));
        assert!(first.open("h1", &minted).is_some());
        assert!(second.open("h1", &minted).is_none());
    }

    #[test]
    fn a_server_keeps_the_newest_keys_it_loaded() {
        let keys = PoolKeys::new(ring(2, 2, Some(1)));
        keys.offer(std::sync::Arc::new(ring(1, 1, None)));
        assert_eq!(keys.get().generation, 2, "an older load does not win");
        keys.offer(std::sync::Arc::new(ring(3, 3, Some(2))));
        assert_eq!(keys.get().generation, 3);
    }

    #[test]
    fn a_nonce_opens_for_its_host_under_its_key_only() {
        let key = ChallengeKey::new(&[7u8; 32]);
        let nonce = hex::encode(key.issue("node1", at(1_800_000_000), &sel(&[0, 7]), [1; 8]));
        let claims = key.open("node1", &nonce).unwrap();
        assert_eq!(claims.expires_at, at(1_800_000_000));
        assert_eq!(key.open("node2", &nonce), None, "bound to its host");
        assert_eq!(ChallengeKey::new(&[8u8; 32]).open("node1", &nonce), None);
        // Upper-case hex is the same nonce.
        assert_eq!(key.open("node1", &nonce.to_ascii_uppercase()), Some(claims));
    }

    #[test]
    fn a_nonce_knows_the_selection_it_asked_for() {
        let key = ChallengeKey::new(b"secret");
        let nonce = hex::encode(key.issue("n", at(1_900_000_000), &sel(&[0, 7]), [0; 8]));
        let claims = key.open("n", &nonce).unwrap();
        assert!(claims.asked_for(&sel(&[7, 0])), "order does not matter");
        assert!(!claims.asked_for(&sel(&[0])));
        assert!(!claims.asked_for(&sel(&[0, 7, 10])));
        let sha1: PcrSelection =
            proto::wire::selection_from_map(&[(HashAlg::Sha1, vec![0, 7])].into_iter().collect());
        assert!(!claims.asked_for(&sha1), "nor does the bank");
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let key = ChallengeKey::new(b"secret");
        let nonce = key.issue("n", at(1_900_000_000), &sel(&[0]), [9; 8]);
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
        let a = key.issue("n", at(1_900_000_000), &sel(&[0]), [1; 8]);
        let b = key.issue("n", at(1_900_000_000), &sel(&[0]), [2; 8]);
        assert_ne!(a, b);
        assert_ne!(a[16..], b[16..], "the tags differ too");
    }

    #[test]
    fn debug_does_not_show_the_key() {
        assert_eq!(
            format!("{:?}", ChallengeKey::new(b"secret")),
            "ChallengeKey(<redacted>)"
        );
    }
}
