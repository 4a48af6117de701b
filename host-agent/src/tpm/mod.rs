//! Access to the host's TPM 2.0.
//!
//! One dedicated thread owns all TPM work (the TSS is blocking and a TPM
//! serves one command at a time); async code sends it requests over a
//! channel and awaits the answer, so it never blocks a runtime thread.

mod ak_store;
mod credential;
mod pcr;
mod worker;

use crate::config::AkType;
use crate::error::Error;
use proto::wire::{PcrSelectionMap, PcrValues};
use std::path::Path;
use std::str::FromStr;
use tokio::sync::{mpsc, oneshot};
use tss_esapi::TctiNameConf;

pub use worker::QUOTE_ATTEMPTS;

/// NV index of the RSA-2048 EK certificate (TCG EK credential profile).
pub const EK_CERT_RSA_NV_INDEX: u32 = 0x01c0_0002;

/// What identifies the TPM to the server: its endorsement key (the default
/// RSA-2048 EK, the parent of the AK) and the manufacturer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkIdentity {
    /// Marshalled TPM2B_PUBLIC of the EK.
    pub public: Vec<u8>,
    /// DER EK certificate from NV index [`EK_CERT_RSA_NV_INDEX`]; `None`
    /// when the TPM has none.
    pub certificate: Option<Vec<u8>>,
}

/// The attestation key, as the server enrolls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkInfo {
    pub ak_type: AkType,
    /// Marshalled TPM2B_PUBLIC (what `tpm2_createak -u` writes).
    pub public: Vec<u8>,
    /// TPM name: nameAlg followed by the digest of the public area.
    pub name: Vec<u8>,
    /// True when the AK was created now rather than loaded from the state dir.
    pub created: bool,
}

/// A quote and the PCR values it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// Marshalled TPMS_ATTEST (`tpm2_quote -m`).
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (`tpm2_quote -s`).
    pub signature: Vec<u8>,
    /// The selected PCR values, matching the quote's pcrDigest.
    pub pcrs: PcrValues,
    /// How many quotes it took (PCRs may change between quote and read).
    pub attempts: u32,
}

/// Parse a TCTI configuration string such as `device:/dev/tpmrm0` or
/// `swtpm:host=127.0.0.1,port=2321`.
pub fn parse_tcti(tcti: &str) -> Result<TctiNameConf, Error> {
    TctiNameConf::from_str(tcti).map_err(|e| {
        Error::config(
            "tcti",
            format!(
                "{tcti:?} is not a TCTI (device:PATH, swtpm:host=H,port=P, mssim:…, tabrmd:…): {e}"
            ),
        )
    })
}

/// Handle to the TPM worker thread. Cheap to share by reference; dropping
/// it lets the thread finish its current request and end.
pub struct Tpm {
    requests: mpsc::Sender<worker::Request>,
    thread: std::thread::JoinHandle<()>,
}

impl Tpm {
    /// Start the worker thread. No TPM connection is opened until the
    /// first request.
    pub fn start(tcti: &str, ak_type: AkType, state_dir: &Path) -> Result<Self, Error> {
        let tcti = parse_tcti(tcti)?;
        let (requests, receiver) = mpsc::channel(4);
        let worker = worker::Worker::new(tcti, ak_type, state_dir);
        let thread = std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || worker.run(receiver))
            .map_err(|e| Error::tpm("start worker thread", e))?;
        Ok(Self { requests, thread })
    }

    /// Load the AK stored in the state directory, or create (and store) a
    /// new one if there is none or it no longer loads.
    pub async fn ensure_ak(&self) -> Result<AkInfo, Error> {
        let (reply, answer) = oneshot::channel();
        self.call(worker::Request::EnsureAk { reply }, answer).await
    }

    /// TPM2_Quote over `selection` with `nonce` as qualifying data, plus the
    /// quoted PCR values. Creates or loads the AK first if needed.
    pub async fn quote(&self, nonce: &[u8], selection: &PcrSelectionMap) -> Result<Quote, Error> {
        let selection = pcr::checked_selection(selection)?;
        let (reply, answer) = oneshot::channel();
        let request = worker::Request::Quote {
            nonce: nonce.to_vec(),
            selection,
            reply,
        };
        self.call(request, answer).await
    }

    /// The EK's public area and certificate (see [`EkIdentity`]).
    pub async fn ek_identity(&self) -> Result<EkIdentity, Error> {
        let (reply, answer) = oneshot::channel();
        self.call(worker::Request::EkIdentity { reply }, answer)
            .await
    }

    /// TPM2_ActivateCredential: recover the secret the server sealed to
    /// this TPM's EK and AK name with TPM2_MakeCredential. `id_object` is
    /// the marshalled TPM2B_ID_OBJECT (credentialBlob), `encrypted_secret`
    /// the marshalled TPM2B_ENCRYPTED_SECRET, both with their size prefix.
    /// A credential made for another EK or AK is a TPM error.
    pub async fn activate_credential(
        &self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let credential = credential::parse(id_object, encrypted_secret)?;
        let (reply, answer) = oneshot::channel();
        let request = worker::Request::ActivateCredential { credential, reply };
        self.call(request, answer).await
    }

    async fn call<T>(
        &self,
        request: worker::Request,
        answer: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        self.requests
            .send(request)
            .await
            .map_err(|_| Error::TpmWorkerGone)?;
        answer.await.map_err(|_| Error::TpmWorkerGone)?
    }

    /// Stop the worker: it finishes the request in progress (if any), closes
    /// its TPM connection and ends; this waits for that without blocking
    /// the runtime.
    pub async fn shutdown(self) {
        let Tpm { requests, thread } = self;
        drop(requests);
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the TPM worker thread panicked"),
            Err(e) => tracing::error!(error = %e, "cannot wait for the TPM worker thread"),
        }
    }
}
