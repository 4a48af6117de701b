//! Reading the event logs the server asks for in a challenge: the UEFI
//! log (`binary_bios_measurements`) and the IMA list in its ascii form
//! (`ascii_runtime_measurements`), from configurable paths so tests can
//! feed files. They are read after quoting, so that each log covers at
//! least what the quote covers (both only grow); the server takes the part
//! of the IMA list the quote covers.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use proto::wire::ImaEvidence;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest log read (each): far above real UEFI logs (tens of KiB) and
/// busy hosts' IMA lists; a bigger file is refused rather than sent.
pub const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;

/// Why a log could not be read; the evidence is then sent without it and
/// the server judges the host without the log (a policy needing it fails).
#[derive(Debug, thiserror::Error)]
pub enum LogReadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than the {limit}-byte limit", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: line {line} is not UTF-8", path.display())]
    NotUtf8 { path: PathBuf, line: usize },
}

impl LogReadError {
    /// The file does not exist (no TPM event log, IMA off, securityfs not mounted).
    pub fn is_missing(&self) -> bool {
        matches!(self, LogReadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Read a whole file, at most `limit` bytes. securityfs files report size 0,
/// so the length is not trusted: the read itself is bounded.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, LogReadError> {
    let io = |source| LogReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(io)?;
    if out.len() as u64 > limit {
        return Err(LogReadError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(out)
}

/// The UEFI log, base64 for the evidence.
pub fn read_uefi_log(path: &Path, limit: u64) -> Result<String, LogReadError> {
    read_bounded(path, limit).map(|b| BASE64.encode(b))
}

/// The IMA list from entry `from` (0-based) on. When the list has fewer
/// entries than `from` the host rebooted since the server's state was
/// made: the whole list is sent, from 0.
pub fn read_ima(path: &Path, from: u64, limit: u64) -> Result<ImaEvidence, LogReadError> {
    let bytes = read_bounded(path, limit)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let line = e
            .as_bytes()
            .get(..valid)
            .map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
            + 1;
        LogReadError::NotUtf8 {
            path: path.to_path_buf(),
            line,
        }
    })?;
    Ok(ima_from(&text, from))
}

/// The lines of an ascii list from entry `from` on (each entry is a line).
pub fn ima_from(text: &str, from: u64) -> ImaEvidence {
    let mut start = 0usize;
    let mut skipped = 0u64;
    while skipped < from {
        match text.get(start..).and_then(|rest| rest.find('\n')) {
            Some(n) => {
                start += n + 1;
                skipped += 1;
            }
            None => break,
        }
    }
    if skipped < from {
        return ImaEvidence {
            from: 0,
            entries: text.to_string(),
        };
    }
    ImaEvidence {
        from,
        entries: text.get(start..).unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIST: &str = "10 a ima-ng sha1:00 /a\n10 b ima-ng sha1:00 /b\n10 c ima-ng sha1:00 /c\n";

    #[test]
    fn ima_continuation_skips_verified_entries() {
        let all = ima_from(LIST, 0);
        assert_eq!((all.from, all.entries.as_str()), (0, LIST));
        let rest = ima_from(LIST, 2);
        assert_eq!(rest.from, 2);
        assert_eq!(rest.entries, "10 c ima-ng sha1:00 /c\n");
        let none = ima_from(LIST, 3);
        assert_eq!((none.from, none.entries.as_str()), (3, ""));
        // A shorter list than the server followed: a reboot, start over.
        let rebooted = ima_from(LIST, 7);
        assert_eq!((rebooted.from, rebooted.entries.as_str()), (0, LIST));
    }

    #[test]
    fn reads_are_bounded_and_missing_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        std::fs::write(&f, [7u8; 100]).unwrap();
        assert_eq!(read_bounded(&f, 100).unwrap().len(), 100);
        let e = read_bounded(&f, 99).unwrap_err();
        assert!(matches!(e, LogReadError::TooLarge { limit: 99, .. }), "{e}");
        assert!(!e.is_missing());
        assert_eq!(read_uefi_log(&f, 100).unwrap().len(), 136);
        let missing = read_uefi_log(&dir.path().join("nope"), 100).unwrap_err();
        assert!(missing.is_missing());
        assert!(missing.to_string().contains("nope"), "{missing}");
        std::fs::write(&f, b"10 a\n\xff\n").unwrap();
        let e = read_ima(&f, 0, 100).unwrap_err();
        assert!(matches!(e, LogReadError::NotUtf8 { line: 2, .. }), "{e}");
    }
}
