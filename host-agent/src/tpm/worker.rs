//! The TPM worker: the one thread that talks to the TPM. Every request opens
//! its own TCTI connection and closes it when done, because a simulator (and
//! a TPM without a resource manager) serves one client at a time and other
//! tools must get their turn between attestations.

use super::ak_store::{self, AkBlobs, AkStore};
use super::credential::Credential;
use super::{pcr, AkInfo, EkIdentity, Quote, EK_CERT_RSA_NV_INDEX};
use crate::config::AkType;
use crate::error::Error;
use proto::tpm::{pcr_digest, Attest, KeyScheme, PublicKey};
use proto::wire::PcrValues;
use proto::HashAlg;
use std::path::Path;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use tss_esapi::abstraction::{ak, ek, nv, DefaultKey};
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle,
    SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::resource_handles::NvAuth;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Private, Public, PublicBuffer, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

/// How often a quote is taken again when a PCR was extended between the
/// quote and the read of the values.
pub const QUOTE_ATTEMPTS: u32 = 3;

pub(crate) enum Request {
    EnsureAk {
        reply: oneshot::Sender<Result<AkInfo, Error>>,
    },
    Quote {
        nonce: Vec<u8>,
        selection: pcr::Selection,
        reply: oneshot::Sender<Result<Quote, Error>>,
    },
    EkIdentity {
        reply: oneshot::Sender<Result<EkIdentity, Error>>,
    },
    ActivateCredential {
        credential: Credential,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
}

/// An AK ready for use: the blobs plus what was derived from them.
struct LoadedBlobs {
    blobs: AkBlobs,
    private: Private,
    public: Public,
    name: Vec<u8>,
}

pub(crate) struct Worker {
    tcti: TctiNameConf,
    ak_type: AkType,
    store: AkStore,
    ak: Option<LoadedBlobs>,
    /// The name of the EK this worker created (see [`with_ek`]).
    ek_name: Option<Vec<u8>>,
}

impl Worker {
    pub fn new(tcti: TctiNameConf, ak_type: AkType, state_dir: &Path) -> Self {
        Self {
            tcti,
            ak_type,
            store: AkStore::new(state_dir, ak_type),
            ak: None,
            ek_name: None,
        }
    }

    /// Serve requests until every sender is gone.
    pub fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(request) = requests.blocking_recv() {
            match request {
                Request::EnsureAk { reply } => {
                    let result = self.guarded("ensure AK", |w| w.ensure_ak());
                    // The requester may have given up (shutdown); that is fine.
                    let _ = reply.send(result);
                }
                Request::Quote {
                    nonce,
                    selection,
                    reply,
                } => {
                    let result = self.guarded("quote", |w| w.quote(&nonce, &selection));
                    let _ = reply.send(result);
                }
                Request::EkIdentity { reply } => {
                    let result = self.guarded("read EK identity", |w| w.ek_identity());
                    let _ = reply.send(result);
                }
                Request::ActivateCredential { credential, reply } => {
                    let result = self.guarded("activate credential", |w| {
                        w.activate_credential(&credential)
                    });
                    let _ = reply.send(result);
                }
            }
        }
        debug!("TPM worker stopped");
    }

    /// Run one request, turning a panic inside the TSS bindings into an
    /// error so that one bad answer does not take the agent down.
    fn guarded<T>(
        &mut self,
        operation: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        outcome.unwrap_or_else(|_| {
            // The cached AK may be half-updated; load it again next time.
            self.ak = None;
            Err(Error::tpm(operation, "the TSS library panicked"))
        })
    }

    fn open(&self) -> Result<Context, Error> {
        Context::new(self.tcti.clone()).map_err(|e| Error::tpm("connect", e))
    }

    fn sign_alg(&self) -> SignatureSchemeAlgorithm {
        match self.ak_type {
            AkType::Rsa => SignatureSchemeAlgorithm::RsaSsa,
            AkType::Ecc => SignatureSchemeAlgorithm::EcDsa,
        }
    }

    fn ensure_ak(&mut self) -> Result<AkInfo, Error> {
        let mut ctx = self.open()?;
        let mut known = self.ek_name.take();
        let outcome = with_ek(&mut ctx, &mut known, |ctx, ek| {
            match self.store.read() {
                Ok(Some(blobs)) => match self.load_stored(ctx, ek, blobs) {
                    Ok(loaded) => return Ok((loaded, false)),
                    Err(e) => warn!(
                        error = %e,
                        file = %self.store.public_path().display(),
                        "the stored AK cannot be used; creating a new one"
                    ),
                },
                Ok(None) => info!(
                    file = %self.store.public_path().display(),
                    "no stored AK; creating one"
                ),
                Err(e) => warn!(error = %e, "the stored AK is unreadable; creating a new one"),
            }
            let loaded = self.create(ctx, ek)?;
            self.store.write(&loaded.blobs)?;
            Ok((loaded, true))
        });
        self.ek_name = known;
        drop(ctx);
        let (loaded, created) = outcome?;
        let info = AkInfo {
            ak_type: self.ak_type,
            public: loaded.blobs.public.clone(),
            name: loaded.name.clone(),
            created,
        };
        info!(
            ak_type = self.ak_type.name(),
            name = %hex::encode(&info.name),
            created,
            "AK ready"
        );
        self.ak = Some(loaded);
        Ok(info)
    }

    /// Check stored blobs by loading them under the EK.
    fn load_stored(
        &self,
        ctx: &mut Context,
        ek: KeyHandle,
        blobs: AkBlobs,
    ) -> Result<LoadedBlobs, Error> {
        let private = Private::try_from(ak_store::tpm2b_payload(&blobs.private).to_vec())
            .map_err(|e| Error::tpm("load AK", e))?;
        let public_buf =
            PublicBuffer::unmarshall(&blobs.public).map_err(|e| Error::tpm("load AK", e))?;
        let public = Public::try_from(public_buf).map_err(|e| Error::tpm("load AK", e))?;
        self.check_public(&blobs.public)?;
        let handle = load_ak(ctx, ek, &private, &public)?;
        let name = with_flush(ctx, handle.into(), "AK", |ctx| {
            checked_name(ctx, handle, &blobs)
        })?;
        Ok(LoadedBlobs {
            blobs,
            private,
            public,
            name,
        })
    }

    fn create(&self, ctx: &mut Context, ek: KeyHandle) -> Result<LoadedBlobs, Error> {
        let created = ak::create_ak(
            ctx,
            ek,
            HashingAlgorithm::Sha256,
            self.sign_alg(),
            None,
            DefaultKey,
        )
        .map_err(|e| Error::tpm("create AK", e))?;
        let public_bytes = PublicBuffer::try_from(created.out_public.clone())
            .and_then(|b| b.marshall())
            .map_err(|e| Error::tpm("create AK", e))?;
        let blobs = AkBlobs {
            private: ak_store::to_tpm2b(created.out_private.value())?,
            public: public_bytes,
        };
        self.check_public(&blobs.public)?;
        // Load it once: proves the blobs work and gives the TPM's own name.
        let handle = load_ak(ctx, ek, &created.out_private, &created.out_public)?;
        let name = with_flush(ctx, handle.into(), "AK", |ctx| {
            checked_name(ctx, handle, &blobs)
        })?;
        Ok(LoadedBlobs {
            blobs,
            private: created.out_private,
            public: created.out_public,
            name,
        })
    }

    /// The public area must decode with the server's decoder and be the
    /// key type and scheme this agent is configured for.
    fn check_public(&self, tpm2b_public: &[u8]) -> Result<(), Error> {
        let public = proto::tpm::Public::decode(tpm2b_public)
            .map_err(|e| Error::tpm("check AK public area", e))?;
        let fits = match (self.ak_type, &public.key, public.scheme) {
            (AkType::Rsa, PublicKey::Rsa { key_bits, .. }, KeyScheme::RsaSsa(HashAlg::Sha256)) => {
                *key_bits == 2048
            }
            (
                AkType::Ecc,
                PublicKey::Ecc {
                    curve: proto::tpm::EccCurve::NistP256,
                    ..
                },
                KeyScheme::Ecdsa(HashAlg::Sha256),
            ) => true,
            _ => false,
        };
        let restricted_signing = public.has(proto::tpm::attr::RESTRICTED)
            && public.has(proto::tpm::attr::SIGN_ENCRYPT)
            && !public.has(proto::tpm::attr::DECRYPT);
        if !fits || !restricted_signing {
            return Err(Error::tpm(
                "check AK public area",
                format!(
                    "not a restricted {} signing key with the expected scheme",
                    self.ak_type.name()
                ),
            ));
        }
        Ok(())
    }

    fn quote(&mut self, nonce: &[u8], selection: &pcr::Selection) -> Result<Quote, Error> {
        let qualifying = Data::try_from(nonce.to_vec()).map_err(|_| Error::Challenge {
            field: "nonce",
            problem: format!("{} bytes is more than the TPM accepts", nonce.len()),
        })?;
        let list = pcr::selection_list(selection)?;
        if self.ak.is_none() {
            self.ensure_ak()?;
        }
        let Some(loaded) = self.ak.as_ref() else {
            return Err(Error::tpm("quote", "no AK"));
        };
        let mut ctx = self.open()?;
        // Once loaded, the AK no longer needs its parent: free the slot.
        let handle = with_ek(&mut ctx, &mut self.ek_name, |ctx, ek| {
            load_ak(ctx, ek, &loaded.private, &loaded.public)
        });
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                // The TPM may have been cleared: let the next ensure decide.
                self.ak = None;
                return Err(e);
            }
        };
        with_flush(&mut ctx, handle.into(), "AK", |ctx| {
            for attempt in 1..=QUOTE_ATTEMPTS {
                let (attest, signature) = ctx
                    .execute_with_nullauth_session(|ctx| {
                        ctx.quote(
                            handle,
                            qualifying.clone(),
                            SignatureScheme::Null,
                            list.clone(),
                        )
                    })
                    .map_err(|e| Error::tpm("quote", e))?;
                let values = pcr::read(ctx, selection)?;
                let attest = attest.marshall().map_err(|e| Error::tpm("quote", e))?;
                let signature = signature.marshall().map_err(|e| Error::tpm("quote", e))?;
                if quote_matches(&attest, &signature, nonce, selection, &values)? {
                    return Ok(Quote {
                        attest,
                        signature,
                        pcrs: to_wire(&values),
                        attempts: attempt,
                    });
                }
                debug!(
                    attempt,
                    "a PCR changed between quote and read; quoting again"
                );
            }
            Err(Error::tpm(
                "quote",
                format!("PCR values kept changing ({QUOTE_ATTEMPTS} attempts)"),
            ))
        })
    }
}

impl Worker {
    /// The EK's public area and, when the manufacturer stored one, its
    /// certificate: what the server needs to trust the EK.
    fn ek_identity(&mut self) -> Result<EkIdentity, Error> {
        let mut ctx = self.open()?;
        let public = with_ek(&mut ctx, &mut self.ek_name, ek_public)?;
        let certificate = read_ek_certificate(&mut ctx)?;
        info!(certificate = certificate.is_some(), "EK identity read");
        Ok(EkIdentity {
            public,
            certificate,
        })
    }

    /// TPM2_ActivateCredential with the AK as the credential's object and
    /// the EK as the key that decrypts the seed; returns the secret. The
    /// TPM releases it only if the credential was made for this AK's name
    /// and this EK.
    fn activate_credential(&mut self, credential: &Credential) -> Result<Vec<u8>, Error> {
        if self.ak.is_none() {
            self.ensure_ak()?;
        }
        let Some(loaded) = self.ak.as_ref() else {
            return Err(Error::tpm("activate credential", "no AK"));
        };
        let mut ctx = self.open()?;
        // Unlike a quote, activation needs the EK loaded next to the AK.
        let outcome = with_ek(&mut ctx, &mut self.ek_name, |ctx, ek| {
            let ak = load_ak(ctx, ek, &loaded.private, &loaded.public)?;
            with_flush(ctx, ak.into(), "AK", |ctx| {
                activate(ctx, ak, ek, credential)
            })
        });
        if matches!(
            outcome,
            Err(Error::Tpm {
                operation: "load AK",
                ..
            })
        ) {
            // The TPM may have been cleared: let the next ensure decide.
            self.ak = None;
        }
        outcome
    }
}

/// Run TPM2_ActivateCredential. The default EK template has no user auth,
/// only the policy PolicySecret(TPM_RH_ENDORSEMENT), so the EK needs a
/// policy session satisfying it; the AK takes its (empty) password.
fn activate(
    ctx: &mut Context,
    ak: KeyHandle,
    ek: KeyHandle,
    credential: &Credential,
) -> Result<Vec<u8>, Error> {
    const OPERATION: &str = "activate credential";
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| Error::tpm("start EK policy session", e))?
        .ok_or_else(|| Error::tpm("start EK policy session", "the TPM returned no session"))?;
    // ESYS starts sessions with continueSession set: the session outlives
    // every command, so it is ours to flush, whatever happens.
    with_flush(
        ctx,
        SessionHandle::from(session).into(),
        "EK policy session",
        |ctx| {
            let policy = PolicySession::try_from(session).map_err(|e| Error::tpm(OPERATION, e))?;
            ctx.execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(|e| Error::tpm("satisfy EK policy", e))?;
            let secret = ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                    ctx.activate_credential(
                        ak,
                        ek,
                        credential.id_object.clone(),
                        credential.secret.clone(),
                    )
                })
                .map_err(|e| Error::tpm(OPERATION, e))?;
            Ok(secret.value().to_vec())
        },
    )
}

/// The EK's marshalled TPM2B_PUBLIC, checked with the server's decoder.
fn ek_public(ctx: &mut Context, ek: KeyHandle) -> Result<Vec<u8>, Error> {
    const OPERATION: &str = "read EK public area";
    let (public, _, _) = ctx
        .execute_without_session(|ctx| ctx.read_public(ek))
        .map_err(|e| Error::tpm(OPERATION, e))?;
    let bytes = PublicBuffer::try_from(public)
        .and_then(|b| b.marshall())
        .map_err(|e| Error::tpm(OPERATION, e))?;
    let decoded = proto::tpm::Public::decode(&bytes).map_err(|e| Error::tpm(OPERATION, e))?;
    let rsa_2048_decrypt = matches!(decoded.key, PublicKey::Rsa { key_bits: 2048, .. })
        && decoded.has(proto::tpm::attr::RESTRICTED)
        && decoded.has(proto::tpm::attr::DECRYPT);
    if !rsa_2048_decrypt {
        return Err(Error::tpm(
            OPERATION,
            "the EK is not a restricted RSA-2048 decryption key",
        ));
    }
    Ok(bytes)
}

/// The RSA EK certificate (DER) from its NV index, or `None` when the TPM
/// has no such index (many firmware TPMs do not ship one).
fn read_ek_certificate(ctx: &mut Context) -> Result<Option<Vec<u8>>, Error> {
    const OPERATION: &str = "read EK certificate";
    let index =
        NvIndexTpmHandle::new(EK_CERT_RSA_NV_INDEX).map_err(|e| Error::tpm(OPERATION, e))?;
    // Ask first rather than interpret a failed read: only "absent" is normal.
    let (handles, _) = ctx
        .execute_without_session(|ctx| {
            ctx.get_capability(CapabilityType::Handles, EK_CERT_RSA_NV_INDEX, 1)
        })
        .map_err(|e| Error::tpm(OPERATION, e))?;
    let present = match handles {
        CapabilityData::Handles(list) => list.into_inner().contains(&TpmHandle::NvIndex(index)),
        _ => return Err(Error::tpm(OPERATION, "the TPM answered another capability")),
    };
    if !present {
        return Ok(None);
    }
    let mut nv_object = ctx
        .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(index)))
        .map_err(|e| Error::tpm(OPERATION, e))?;
    let attributes = match ctx
        .execute_without_session(|ctx| ctx.nv_read_public(NvIndexHandle::from(nv_object)))
    {
        Ok((nv_public, _)) => nv_public.attributes(),
        Err(e) => {
            close_quietly(ctx, &mut nv_object);
            return Err(Error::tpm(OPERATION, e));
        }
    };
    // The EK credential profile makes the index readable with its own
    // empty auth; the owner's auth may be set on a managed machine.
    let auth = if attributes.auth_read() {
        NvAuth::NvIndex(NvIndexHandle::from(nv_object))
    } else if attributes.owner_read() {
        NvAuth::Owner
    } else {
        close_quietly(ctx, &mut nv_object);
        return Err(Error::tpm(
            OPERATION,
            "the NV index is readable neither with its own auth nor the owner's",
        ));
    };
    // read_full looks the index up again and gets this same ESYS object
    // (ESYS keeps one per TPM handle), which it closes when done; if it
    // fails before that, dropping the context closes it.
    let outcome = ctx
        .execute_with_nullauth_session(|ctx| nv::read_full(ctx, auth, index))
        .map_err(|e| Error::tpm(OPERATION, e));
    let mut certificate = outcome?;
    if certificate.is_empty() {
        return Err(Error::tpm(OPERATION, "the NV index is empty"));
    }
    // Some TPMs pad the index past the certificate; the server wants DER.
    certificate.truncate(der_len(&certificate).unwrap_or(certificate.len()));
    Ok(Some(certificate))
}

/// The length of the DER SEQUENCE (header included) at the start of
/// `bytes`, if it starts with one that fits.
fn der_len(bytes: &[u8]) -> Option<usize> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (header, content) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        // Long form: the low bits count the big-endian length bytes.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let len = rest
            .get(..count)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (2 + count, len)
    };
    let total = header.checked_add(content)?;
    (total <= bytes.len()).then_some(total)
}

/// Release an ESYS object that names an NV index. It is bookkeeping in the
/// TSS, not a TPM slot, and the context is dropped after each request anyway.
fn close_quietly(ctx: &mut Context, object: &mut ObjectHandle) {
    if let Err(e) = ctx.tr_close(object) {
        debug!(error = %e, "cannot close an ESYS object");
    }
}

/// Where the TCG EK Credential Profile has the RSA EK made persistent
/// (swtpm_setup and most manufacturers do).
const EK_RSA_PERSISTENT_HANDLE: u32 = 0x8101_0001;

/// Run `f` with the EK. Creating it (TPM2_CreatePrimary) derives an RSA key
/// from the endorsement seed: most of a quote's TPM time on swtpm, and
/// seconds on some hardware TPMs. So the first use creates it and keeps its
/// name in `known`; later uses take the persistent EK instead when the TPM
/// has one with that very name (the name covers the public key and policy,
/// so it is the same key), and create the EK again otherwise.
fn with_ek<T>(
    ctx: &mut Context,
    known: &mut Option<Vec<u8>>,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Error>,
) -> Result<T, Error> {
    if let Some(mut persistent) = known.as_deref().and_then(|name| persistent_ek(ctx, name)) {
        let outcome = f(ctx, persistent.into());
        // Release ESYS's record of it; the TPM keeps the object.
        if let Err(e) = ctx.tr_close(&mut persistent) {
            debug!(error = %e, "cannot close the persistent EK's handle");
        }
        return outcome;
    }
    let ek = create_ek(ctx)?;
    match ctx.tr_get_name(ek.into()) {
        Ok(name) => *known = Some(name.value().to_vec()),
        Err(e) => debug!(error = %e, "cannot read the EK's name"),
    }
    with_flush(ctx, ek.into(), "EK", |ctx| f(ctx, ek))
}

/// The persistent EK, if the TPM has one named `name`.
fn persistent_ek(ctx: &mut Context, name: &[u8]) -> Option<ObjectHandle> {
    let handle = PersistentTpmHandle::new(EK_RSA_PERSISTENT_HANDLE).ok()?;
    let mut object = ctx
        .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(handle)))
        .ok()?;
    match ctx.tr_get_name(object) {
        Ok(found) if found.value() == name => Some(object),
        _ => {
            let _ = ctx.tr_close(&mut object);
            None
        }
    }
}

fn create_ek(ctx: &mut Context) -> Result<KeyHandle, Error> {
    // The default RSA-2048 EK template always yields the same key from the
    // endorsement seed, so AK blobs made under it load again later.
    ek::create_ek_object(ctx, AsymmetricAlgorithm::Rsa, DefaultKey)
        .map_err(|e| Error::tpm("create EK", e))
}

fn load_ak(
    ctx: &mut Context,
    ek: KeyHandle,
    private: &Private,
    public: &Public,
) -> Result<KeyHandle, Error> {
    ak::load_ak(ctx, ek, None, private.clone(), public.clone())
        .map_err(|e| Error::tpm("load AK", e))
}

/// The TPM's name for the loaded AK, which must equal the name the server
/// computes from the public area (proto's decoder).
fn checked_name(ctx: &mut Context, handle: KeyHandle, blobs: &AkBlobs) -> Result<Vec<u8>, Error> {
    let tpm_name = ctx
        .tr_get_name(handle.into())
        .map_err(|e| Error::tpm("read AK name", e))?;
    let public = proto::tpm::Public::decode(&blobs.public)
        .map_err(|e| Error::tpm("check AK public area", e))?;
    let name = public.name();
    if tpm_name.value() != name.as_slice() {
        return Err(Error::tpm(
            "read AK name",
            "the TPM's name differs from the name of the stored public area",
        ));
    }
    Ok(name)
}

/// Run `f`, then flush the transient `handle` whatever `f` returned.
fn with_flush<T>(
    ctx: &mut Context,
    handle: ObjectHandle,
    what: &'static str,
    f: impl FnOnce(&mut Context) -> Result<T, Error>,
) -> Result<T, Error> {
    let outcome = f(ctx);
    if let Err(e) = ctx.flush_context(handle) {
        // The result is still good; the TPM may run out of object slots.
        warn!(object = what, error = %e, "cannot flush transient object");
    }
    outcome
}

/// Whether the attest is a quote over `nonce` and `selection` whose PCR
/// digest matches `values`. A digest mismatch means a PCR changed between
/// the quote and the read (false: quote again); anything else is an error.
fn quote_matches(
    attest: &[u8],
    signature: &[u8],
    nonce: &[u8],
    selection: &pcr::Selection,
    values: &pcr::Values,
) -> Result<bool, Error> {
    let decoded = Attest::decode(attest).map_err(|e| Error::tpm("decode quote", e))?;
    let sig =
        proto::tpm::Signature::decode(signature).map_err(|e| Error::tpm("decode quote", e))?;
    if decoded.extra_data != nonce {
        return Err(Error::tpm("quote", "the quote does not carry the nonce"));
    }
    let quoted: pcr::Selection = decoded.quote.pcr_select.normalized().into_iter().collect();
    if &quoted != selection {
        return Err(Error::tpm(
            "quote",
            "the TPM quoted another PCR selection than asked (is every bank allocated?)",
        ));
    }
    let mut ordered: Vec<&[u8]> = Vec::new();
    for (alg, pcrs) in &decoded.quote.pcr_select.banks {
        for idx in pcrs {
            let value = values
                .get(alg)
                .and_then(|bank| bank.get(idx))
                .ok_or_else(|| Error::tpm("quote", format!("no value read for {alg} PCR {idx}")))?;
            ordered.push(value);
        }
    }
    Ok(pcr_digest(sig.hash(), ordered) == decoded.quote.pcr_digest)
}

fn to_wire(values: &pcr::Values) -> PcrValues {
    values
        .iter()
        .map(|(alg, bank)| {
            (
                *alg,
                bank.iter().map(|(idx, v)| (*idx, hex::encode(v))).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::tpm::{ClockInfo, PcrSelection, QuoteInfo, Signature};

    fn selection() -> pcr::Selection {
        [(HashAlg::Sha256, [0u8, 7].into_iter().collect())].into()
    }

    fn values(pcr7: u8) -> pcr::Values {
        [(
            HashAlg::Sha256,
            [(0u8, vec![0u8; 32]), (7u8, vec![pcr7; 32])].into(),
        )]
        .into()
    }

    fn attest(nonce: &[u8], quoted_values: &pcr::Values, banks: &pcr::Selection) -> Vec<u8> {
        let ordered: Vec<&[u8]> = quoted_values[&HashAlg::Sha256]
            .values()
            .map(Vec::as_slice)
            .collect();
        Attest {
            qualified_signer: vec![0; 34],
            extra_data: nonce.to_vec(),
            clock_info: ClockInfo::default(),
            firmware_version: 1,
            quote: QuoteInfo {
                pcr_select: PcrSelection {
                    banks: banks.iter().map(|(a, p)| (*a, p.clone())).collect(),
                },
                pcr_digest: pcr_digest(HashAlg::Sha256, ordered),
            },
        }
        .encode()
    }

    fn signature() -> Vec<u8> {
        Signature::RsaSsa {
            hash: HashAlg::Sha256,
            sig: vec![1; 256],
        }
        .encode()
    }

    #[test]
    fn matching_quote_is_accepted() {
        let nonce = [9u8; 20];
        let a = attest(&nonce, &values(1), &selection());
        assert!(quote_matches(&a, &signature(), &nonce, &selection(), &values(1)).unwrap());
    }

    #[test]
    fn changed_pcr_asks_for_another_quote() {
        let nonce = [9u8; 20];
        let a = attest(&nonce, &values(1), &selection());
        assert!(!quote_matches(&a, &signature(), &nonce, &selection(), &values(2)).unwrap());
    }

    #[test]
    fn wrong_nonce_or_selection_is_an_error() {
        let nonce = [9u8; 20];
        let a = attest(&nonce, &values(1), &selection());
        assert!(quote_matches(&a, &signature(), &[8u8; 20], &selection(), &values(1)).is_err());
        let wider: pcr::Selection = [(HashAlg::Sha256, [0u8, 7, 8].into_iter().collect())].into();
        assert!(quote_matches(&a, &signature(), &nonce, &wider, &values(1)).is_err());
        assert!(quote_matches(&a[..10], &signature(), &nonce, &selection(), &values(1)).is_err());
    }

    #[test]
    fn der_length_drops_nv_padding() {
        // SEQUENCE, long form length 0x0105, content, then padding.
        let mut cert = vec![0x30, 0x82, 0x01, 0x05];
        cert.extend([7u8; 0x105]);
        let exact = cert.len();
        assert_eq!(der_len(&cert), Some(exact));
        cert.extend([0xff; 20]);
        assert_eq!(der_len(&cert), Some(exact));
        assert_eq!(der_len(&[0x30, 0x03, 1, 2, 3, 0, 0]), Some(5));
        // Not DER, or claiming more than there is: leave it alone.
        assert_eq!(der_len(&[0x30, 0x82, 0x01]), None);
        assert_eq!(der_len(&[0x30, 0x82, 0x01, 0x05, 1]), None);
        assert_eq!(der_len(&[0x04, 0x01, 1]), None);
        assert_eq!(der_len(&[0x30, 0x80, 1]), None);
        assert_eq!(der_len(&[]), None);
    }

    #[test]
    fn wire_values_are_hex() {
        let wire = to_wire(&values(0xab));
        assert_eq!(wire[&HashAlg::Sha256][&7], "ab".repeat(32));
        assert_eq!(wire[&HashAlg::Sha256].len(), 2);
    }
}
