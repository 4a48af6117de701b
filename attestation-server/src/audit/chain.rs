//! Tamper evidence: every stored event is a link of its server's hash chain
//! (`hash = SHA-256(prev_hash || canonical event JSON)`), and the server
//! signs checkpoints of the chain with its P-256 key. An exported log is
//! JSON lines of [`ExportRecord`]s; [`verify`] walks it and names the first
//! event that was altered, removed or reordered.

use crate::store::{Checkpoint, StoredEvent};
use chrono::{DateTime, Utc};
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// `prev_hash` of the first event of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The SubjectPublicKeyInfo prefix of an uncompressed P-256 key (RFC 5480).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// What the store keeps next to an event body: its chain, and the columns
/// the query API filters on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMeta {
    pub server: String,
    pub canonical: String,
    pub action: String,
    pub outcome: String,
    pub initiator_id: String,
    pub initiator_name: String,
    pub target_id: String,
    pub target_name: String,
}

impl EventMeta {
    /// Read from a stored body; a body that is not JSON is chained as text
    /// (we build every body ourselves, so that does not happen in practice).
    pub fn of(body: &str) -> Self {
        let Ok(v) = serde_json::from_str::<Value>(body) else {
            return Self {
                canonical: body.to_string(),
                ..Self::default()
            };
        };
        let s = |a: &str, b: &str| {
            let x = if b.is_empty() { &v[a] } else { &v[a][b] };
            x.as_str().unwrap_or_default().to_string()
        };
        Self {
            server: s("observer", "name"),
            canonical: canonical_json(&v),
            action: s("action", ""),
            outcome: s("outcome", ""),
            initiator_id: s("initiator", "id"),
            initiator_name: s("initiator", "name"),
            target_id: s("target", "id"),
            target_name: s("target", "name"),
        }
    }
}

/// Compact JSON with object keys sorted at every level, so the hash does not
/// depend on how a serializer orders fields.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if let Some(x) = map.get(*k) {
                    write_canonical(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The hash of a link: hex SHA-256 over the previous hash (hex) and the event.
pub fn link(prev_hash: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

/// The bytes a checkpoint signature covers.
fn checkpoint_message(
    server: &str,
    seq: i64,
    count: i64,
    hash: &str,
    at: DateTime<Utc>,
) -> Vec<u8> {
    format!(
        "attestation-audit-checkpoint/v1\n{server}\n{seq}\n{count}\n{hash}\n{}",
        at.timestamp_micros()
    )
    .into_bytes()
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path} is not a PKCS#8 P-256 key: {detail}")]
    Invalid { path: String, detail: String },
}

/// The server's checkpoint signing key (PKCS#8 PEM, P-256).
pub struct SigningKey {
    pair: EcdsaKeyPair,
}

impl SigningKey {
    pub fn load(path: &std::path::Path) -> Result<Self, KeyError> {
        use rustls_pki_types::pem::PemObject;
        let p = path.display().to_string();
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| {
            KeyError::Read {
                path: p.clone(),
                detail: e.to_string(),
            }
        })?;
        Self::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|detail| KeyError::Invalid { path: p, detail })
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
            .map(|pair| Self { pair })
            .map_err(|e| e.to_string())
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// Sign the chain of `server` as it stands at `seq`.
    pub fn checkpoint(
        &self,
        server: &str,
        seq: i64,
        count: i64,
        hash: &str,
        at: DateTime<Utc>,
    ) -> Result<Checkpoint, String> {
        let rng = ring::rand::SystemRandom::new();
        let sig = self
            .pair
            .sign(&rng, &checkpoint_message(server, seq, count, hash, at))
            .map_err(|e| e.to_string())?;
        Ok(Checkpoint {
            server: server.to_string(),
            seq,
            count,
            hash: hash.to_string(),
            signed_at: at,
            public_key: self.public_key_hex(),
            signature: hex::encode(sig.as_ref()),
        })
    }
}

/// The uncompressed P-256 point from a `PUBLIC KEY` PEM (SubjectPublicKeyInfo).
pub fn public_key_from_pem(pem: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    let spki = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PUBLIC KEY PEM: {e}"))?;
    let der: &[u8] = spki.as_ref();
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 => Ok(point.to_vec()),
        _ => Err("not an uncompressed P-256 public key".into()),
    }
}

/// One line of an exported log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "record", rename_all = "lowercase")]
pub enum ExportRecord {
    Event {
        seq: i64,
        server: String,
        chain_index: i64,
        prev_hash: String,
        hash: String,
        event: Value,
    },
    Checkpoint(Checkpoint),
}

impl ExportRecord {
    pub fn event(e: &StoredEvent) -> Self {
        ExportRecord::Event {
            seq: e.seq,
            server: e.server.clone(),
            chain_index: e.chain_index,
            prev_hash: e.prev_hash.clone(),
            hash: e.hash.clone(),
            event: serde_json::from_str(&e.body).unwrap_or(Value::String(e.body.clone())),
        }
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub events: usize,
    pub checkpoints: usize,
    /// Checkpoints whose signature was checked against a key given by the operator.
    pub checkpoints_with_trusted_key: usize,
    /// The first problem, if any: it names the event (line, id, seq).
    pub problem: Option<String>,
}

struct ChainState {
    hash: String,
    index: i64,
    seq: i64,
    id: String,
}

/// Check an exported log: every event's hash, every link to the previous
/// event of its server, the order, and each checkpoint's signature and
/// hash. `trusted_key` is the uncompressed P-256 point the operator expects;
/// without it checkpoints are checked against the key they name (which
/// proves consistency, not origin).
pub fn verify(text: &str, trusted_key: Option<&[u8]>) -> VerifyReport {
    let mut report = VerifyReport {
        events: 0,
        checkpoints: 0,
        checkpoints_with_trusted_key: 0,
        problem: None,
    };
    let mut chains: HashMap<String, ChainState> = HashMap::new();
    // (server, seq) -> hash of every verified event, for checkpoints.
    let mut seen: HashMap<(String, i64), String> = HashMap::new();
    let mut checkpoints = Vec::new();
    // Every (server, chain index) in the file: a gap whose link appears
    // later is a reordering, not a removal.
    let present: std::collections::HashSet<(String, i64)> = text
        .lines()
        .filter_map(|l| match serde_json::from_str::<ExportRecord>(l) {
            Ok(ExportRecord::Event {
                server,
                chain_index,
                ..
            }) => Some((server, chain_index)),
            _ => None,
        })
        .collect();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let rec: ExportRecord = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                report.problem = Some(format!("line {line_no}: not an export record: {e}"));
                return report;
            }
        };
        match rec {
            ExportRecord::Checkpoint(c) => checkpoints.push((line_no, c)),
            ExportRecord::Event {
                seq,
                server,
                chain_index,
                prev_hash,
                hash,
                event,
            } => {
                report.events += 1;
                let id = event["id"].as_str().unwrap_or("?").to_string();
                let name = format!("event {id} (line {line_no}, seq {seq})");
                if link(&prev_hash, &canonical_json(&event)) != hash {
                    report.problem = Some(format!(
                        "{name} was altered: its hash does not match its content"
                    ));
                    return report;
                }
                if let Some(prev) = chains.get(&server) {
                    if seq <= prev.seq || chain_index <= prev.index {
                        report.problem = Some(format!(
                            "{name} is out of order: it follows event {} (seq {}) of server {server} (reordered)",
                            prev.id, prev.seq
                        ));
                        return report;
                    }
                    if chain_index > prev.index + 1
                        && present.contains(&(server.clone(), prev.index + 1))
                    {
                        report.problem = Some(format!(
                            "{name} is out of order: event {} of server {server} comes later in the file (reordered)",
                            prev.index + 1
                        ));
                        return report;
                    }
                    if chain_index > prev.index + 1 {
                        report.problem = Some(format!(
                            "{} event(s) of server {server} were removed before {name} (chain index jumps from {} to {chain_index})",
                            chain_index - prev.index - 1,
                            prev.index
                        ));
                        return report;
                    }
                    if prev_hash != prev.hash {
                        report.problem = Some(format!(
                            "{name} does not link to the event before it ({}, seq {}): that event was altered or replaced",
                            prev.id, prev.seq
                        ));
                        return report;
                    }
                } else if chain_index == 1 && prev_hash != GENESIS {
                    report.problem = Some(format!(
                        "{name} starts the chain of {server} but does not link to the genesis hash"
                    ));
                    return report;
                }
                seen.insert((server.clone(), seq), hash.clone());
                chains.insert(
                    server,
                    ChainState {
                        hash,
                        index: chain_index,
                        seq,
                        id,
                    },
                );
            }
        }
    }
    for (line_no, c) in checkpoints {
        report.checkpoints += 1;
        let key = match trusted_key {
            Some(k) => {
                if hex::encode(k) != c.public_key {
                    report.problem = Some(format!(
                        "checkpoint at line {line_no} (seq {}) is signed by another key than the one given",
                        c.seq
                    ));
                    return report;
                }
                report.checkpoints_with_trusted_key += 1;
                k.to_vec()
            }
            None => hex::decode(&c.public_key).unwrap_or_default(),
        };
        let sig = hex::decode(&c.signature).unwrap_or_default();
        let pk = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key);
        if pk
            .verify(
                &checkpoint_message(&c.server, c.seq, c.count, &c.hash, c.signed_at),
                &sig,
            )
            .is_err()
        {
            report.problem = Some(format!(
                "checkpoint at line {line_no} (seq {}) has a bad signature",
                c.seq
            ));
            return report;
        }
        let Some(chain) = chains.get(&c.server) else {
            continue;
        };
        if c.seq > chain.seq {
            // Signed after the export's last event: the tail was cut off.
            if c.count > chain.index {
                report.problem = Some(format!(
                    "checkpoint at line {line_no} covers {} events of {} but the log ends after {} (events removed at the end, after event {})",
                    c.count, c.server, chain.index, chain.id
                ));
                return report;
            }
            continue;
        }
        match seen.get(&(c.server.clone(), c.seq)) {
            Some(h) if *h == c.hash => {}
            Some(_) => {
                report.problem = Some(format!(
                    "event at seq {} differs from the signed checkpoint at line {line_no}: the chain was rewritten",
                    c.seq
                ));
                return report;
            }
            // Pruned by retention before the export: nothing to compare.
            None => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":"x"}}"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":"x","d":[{"y":2,"z":1}]},"b":1}"#
        );
    }

    #[test]
    fn checkpoint_signatures_verify_only_for_their_content() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = SigningKey::from_pkcs8(pkcs8.as_ref()).unwrap();
        let c = key
            .checkpoint("s", 5, 5, &link(GENESIS, "{}"), Utc::now())
            .unwrap();
        let line = serde_json::to_string(&ExportRecord::Checkpoint(c.clone())).unwrap();
        assert_eq!(verify(&line, None).problem, None);
        let mut forged = c;
        forged.count = 6;
        let line = serde_json::to_string(&ExportRecord::Checkpoint(forged)).unwrap();
        assert!(verify(&line, None)
            .problem
            .unwrap()
            .contains("bad signature"));
    }
}
