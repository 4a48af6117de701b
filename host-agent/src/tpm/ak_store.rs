//! The AK's blobs in the state directory, so that a restarted agent keeps
//! the key the server has enrolled. The private blob is wrapped by the TPM
//! (useless off this TPM); both files use the tpm2-tools layout
//! (`tpm2_createak -r/-u`): marshalled TPM2B_PRIVATE and TPM2B_PUBLIC.

use crate::config::AkType;
use crate::error::Error;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Marshalled AK blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AkBlobs {
    /// TPM2B_PRIVATE: u16 size, then the TPM-wrapped private area.
    pub private: Vec<u8>,
    /// TPM2B_PUBLIC: u16 size, then the TPMT_PUBLIC.
    pub public: Vec<u8>,
}

pub(crate) struct AkStore {
    private_path: PathBuf,
    public_path: PathBuf,
}

impl AkStore {
    pub fn new(state_dir: &Path, ak_type: AkType) -> Self {
        let name = ak_type.name();
        Self {
            private_path: state_dir.join(format!("ak-{name}.priv")),
            public_path: state_dir.join(format!("ak-{name}.pub")),
        }
    }

    pub fn public_path(&self) -> &Path {
        &self.public_path
    }

    /// The stored blobs; `None` when there are none yet.
    pub fn read(&self) -> Result<Option<AkBlobs>, Error> {
        let private = match read_optional(&self.private_path)? {
            Some(b) => b,
            None => return Ok(None),
        };
        let public = match read_optional(&self.public_path)? {
            Some(b) => b,
            None => return Ok(None),
        };
        for (path, bytes) in [(&self.private_path, &private), (&self.public_path, &public)] {
            check_tpm2b(bytes).map_err(|problem| Error::State {
                path: path.clone(),
                source: std::io::Error::new(ErrorKind::InvalidData, problem),
            })?;
        }
        Ok(Some(AkBlobs { private, public }))
    }

    /// Store the blobs; each file is replaced atomically so that a crash
    /// never leaves a half-written key behind.
    pub fn write(&self, blobs: &AkBlobs) -> Result<(), Error> {
        if let Some(dir) = self.private_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::State {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // Public first: a lone public file is ignored on the next start.
        write_atomic(&self.public_path, &blobs.public)?;
        write_atomic(&self.private_path, &blobs.private)
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::State {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let state = |source| Error::State {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = std::fs::File::create(&tmp).map_err(state)?;
    file.write_all(bytes).map_err(state)?;
    file.sync_all().map_err(state)?;
    std::fs::rename(&tmp, path).map_err(state)
}

/// A TPM2B is a big-endian u16 size followed by exactly that many bytes.
fn check_tpm2b(bytes: &[u8]) -> Result<(), String> {
    match bytes {
        [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => {
            if rest.is_empty() {
                Err("empty TPM2B".into())
            } else {
                Ok(())
            }
        }
        [_, _, ..] => Err(format!(
            "size field does not match the {} bytes of the file",
            bytes.len()
        )),
        _ => Err("shorter than a TPM2B size field".into()),
    }
}

/// Prefix `data` with its u16 size (a marshalled TPM2B).
pub(crate) fn to_tpm2b(data: &[u8]) -> Result<Vec<u8>, Error> {
    let len = u16::try_from(data.len())
        .map_err(|_| Error::tpm("marshal", format!("{} bytes exceed a TPM2B", data.len())))?;
    let mut out = Vec::with_capacity(data.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// The payload of a TPM2B checked by [`AkStore::read`].
pub(crate) fn tpm2b_payload(bytes: &[u8]) -> &[u8] {
    bytes.get(2..).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = AkStore::new(&dir.path().join("nested"), AkType::Ecc);
        assert_eq!(store.read().unwrap(), None);
        let blobs = AkBlobs {
            private: to_tpm2b(&[1, 2, 3]).unwrap(),
            public: to_tpm2b(&[4; 300]).unwrap(),
        };
        store.write(&blobs).unwrap();
        assert_eq!(store.read().unwrap(), Some(blobs.clone()));
        assert!(dir.path().join("nested/ak-ecc.priv").is_file());
        assert!(dir.path().join("nested/ak-ecc.pub").is_file());
        assert_eq!(tpm2b_payload(&blobs.private), &[1, 2, 3]);
        // Another key type has its own files.
        assert_eq!(
            AkStore::new(&dir.path().join("nested"), AkType::Rsa)
                .read()
                .unwrap(),
            None
        );
    }

    #[test]
    fn corrupt_blob_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = AkStore::new(dir.path(), AkType::Rsa);
        store
            .write(&AkBlobs {
                private: to_tpm2b(&[1, 2, 3]).unwrap(),
                public: to_tpm2b(&[4, 5]).unwrap(),
            })
            .unwrap();
        std::fs::write(dir.path().join("ak-rsa.priv"), [0, 9, 1]).unwrap();
        match store.read() {
            Err(Error::State { path, source }) => {
                assert!(path.ends_with("ak-rsa.priv"));
                assert_eq!(source.kind(), ErrorKind::InvalidData);
            }
            other => panic!("expected a state error, got {other:?}"),
        }
        std::fs::write(dir.path().join("ak-rsa.priv"), [0]).unwrap();
        assert!(store.read().is_err());
    }

    #[test]
    fn tpm2b_size_is_checked() {
        assert!(check_tpm2b(&[0, 2, 7, 7]).is_ok());
        assert!(check_tpm2b(&[0, 3, 7, 7]).is_err());
        assert!(check_tpm2b(&[0, 0]).is_err());
        assert!(check_tpm2b(&[]).is_err());
        assert!(to_tpm2b(&vec![0; 70_000]).is_err());
    }
}
