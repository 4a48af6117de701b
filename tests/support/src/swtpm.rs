//! One software TPM per test.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::local_ca::LocalCa;
use crate::ports;

/// NV index of the RSA 2048 EK certificate (TCG EK credential profile).
const EK_CERT_RSA_NV_INDEX: &str = "0x01c00002";
/// How often to try fresh ports when another process takes ours first.
const START_ATTEMPTS: usize = 5;
/// How long swtpm may take to listen after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running swtpm with its own state directory, local CA and TCP ports.
///
/// Dropping it kills the swtpm process and removes the directory.
#[derive(Debug)]
pub struct SwTpm {
    child: Child,
    server_port: u16,
    ctrl_port: u16,
    state_dir: PathBuf,
    local_ca: LocalCa,
    /// Last field so it is removed after the process is gone.
    dir: TempDir,
}

impl SwTpm {
    /// Manufactures a fresh TPM (EK, EK certificate, platform certificate)
    /// and starts swtpm serving it on two free loopback ports (P for
    /// commands, P+1 for control, as the swtpm TCTI expects).
    pub fn start() -> anyhow::Result<SwTpm> {
        crate::require_tools()?;
        let dir = tempfile::Builder::new()
            .prefix("swtpm-test-")
            .tempdir()
            .context("creating the swtpm temp dir")?;
        let local_ca = LocalCa::create(dir.path())?;
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        manufacture(&state_dir, &local_ca, dir.path())?;

        let (child, server_port, ctrl_port) = spawn_on_free_ports(&state_dir, dir.path(), None)?;
        Ok(SwTpm {
            child,
            server_port,
            ctrl_port,
            state_dir,
            local_ca,
            dir,
        })
    }

    /// The TCTI string for tpm2-tools and tss-esapi.
    ///
    /// It stays the same across [`SwTpm::restart`] unless the old ports were
    /// taken meanwhile, so re-read it after a restart.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.server_port)
    }

    /// The TPM command port.
    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// The swtpm control channel port (always `server_port() + 1`).
    pub fn ctrl_port(&self) -> u16 {
        self.ctrl_port
    }

    /// The directory holding the TPM's persistent state.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The local CA's root certificate, then its intermediate (issuer)
    /// certificate, both PEM; they verify the EK and platform certificates.
    pub fn local_ca_certs(&self) -> Vec<PathBuf> {
        self.local_ca.certs()
    }

    /// A tpm2-tools command aimed at this TPM (TPM2TOOLS_TCTI set).
    pub fn tool<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .stdin(Stdio::null());
        command
    }

    /// Runs a tpm2-tools command against this TPM; fails with its stderr if
    /// it exits non-zero.
    pub fn run_tool<I, S>(&self, program: &str, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&mut self.tool(program, args))
    }

    /// Extends PCR `index` of `bank` (e.g. "sha256") with `digest_hex`.
    pub fn pcr_extend(&self, index: u8, bank: &str, digest_hex: &str) -> anyhow::Result<()> {
        let digest = hex::decode(digest_hex)
            .with_context(|| format!("PCR extend digest {digest_hex:?} is not hex"))?;
        if digest.is_empty() {
            bail!("PCR extend digest is empty");
        }
        self.run_tool("tpm2_pcrextend", [format!("{index}:{bank}={digest_hex}")])?;
        Ok(())
    }

    /// Extends PCR `index` of `bank` with each of `digests_hex` in order,
    /// a few hundred per tpm2_pcrextend run (a long IMA list in seconds).
    pub fn pcr_extend_all(
        &self,
        index: u8,
        bank: &str,
        digests_hex: &[String],
    ) -> anyhow::Result<()> {
        for chunk in digests_hex.chunks(200) {
            self.run_tool(
                "tpm2_pcrextend",
                chunk.iter().map(|d| format!("{index}:{bank}={d}")),
            )?;
        }
        Ok(())
    }

    /// Reads PCR `index` of `bank`, as lowercase hex.
    pub fn pcr_read(&self, bank: &str, index: u8) -> anyhow::Result<String> {
        let out = tempfile::NamedTempFile::new_in(self.dir.path())
            .context("creating a temp file for tpm2_pcrread")?;
        self.run_tool(
            "tpm2_pcrread",
            [
                OsStr::new(&format!("{bank}:{index}")),
                OsStr::new("-o"),
                out.path().as_os_str(),
            ],
        )?;
        let value = std::fs::read(out.path()).context("reading tpm2_pcrread's output")?;
        // An inactive bank is not an error for tpm2_pcrread: it prints nothing.
        if value.is_empty() {
            bail!("PCR bank {bank} is not active on this TPM");
        }
        Ok(hex::encode(value))
    }

    /// The DER EK certificate swtpm_setup stored for the RSA EK.
    pub fn ek_cert_der(&self) -> anyhow::Result<Vec<u8>> {
        let out = tempfile::NamedTempFile::new_in(self.dir.path())
            .context("creating a temp file for tpm2_nvread")?;
        self.run_tool(
            "tpm2_nvread",
            [
                OsStr::new(EK_CERT_RSA_NV_INDEX),
                OsStr::new("-C"),
                OsStr::new("o"),
                OsStr::new("-o"),
                out.path().as_os_str(),
            ],
        )?;
        std::fs::read(out.path()).context("reading tpm2_nvread's output")
    }

    /// Reboots the TPM: an orderly TPM2_Shutdown, then swtpm is stopped
    /// and started again on the same state, which resets the PCRs.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        // Orderly, so the TPM does not count a disorderly shutdown against
        // dictionary-attack protection. A failure here only makes the reboot
        // disorderly, which is still a reboot.
        if let Err(err) = self.run_tool("tpm2_shutdown", ["-c"]) {
            eprintln!("swtpm restart: tpm2_shutdown failed, rebooting anyway: {err:#}");
        }
        self.stop();
        let old_ports = (self.server_port, self.ctrl_port);
        let (child, server_port, ctrl_port) =
            spawn_on_free_ports(&self.state_dir, self.dir.path(), Some(old_ports))?;
        if (server_port, ctrl_port) != old_ports {
            ports::release(&[old_ports.0, old_ports.1]);
        }
        self.child = child;
        self.server_port = server_port;
        self.ctrl_port = ctrl_port;
        Ok(())
    }

    /// Kills swtpm by pid and reaps it; harmless if it already exited.
    fn stop(&mut self) {
        // Errors mean the process is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        self.stop();
        ports::release(&[self.server_port, self.ctrl_port]);
        // `dir` is removed when the TempDir field drops.
    }
}

/// Creates the TPM state: EK, EK certificate and platform certificate from
/// the instance's own local CA.
fn manufacture(state_dir: &Path, local_ca: &LocalCa, dir: &Path) -> anyhow::Result<()> {
    let log = dir.join("swtpm_setup.log");
    let mut setup = Command::new("swtpm_setup");
    setup
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(state_dir)
        .args([
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--overwrite",
        ])
        .arg("--config")
        .arg(&local_ca.setup_conf)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .env("XDG_CONFIG_HOME", dir);
    run(&mut setup).with_context(|| format!("swtpm_setup failed; log:\n{}", read_log(&log)))?;
    for cert in local_ca.certs() {
        if !cert.is_file() {
            bail!("swtpm_setup did not create {}", cert.display());
        }
    }
    Ok(())
}

/// Starts swtpm, first on `preferred` ports if given (a restart keeps its
/// TCTI), otherwise or if those are taken on fresh free ports.
fn spawn_on_free_ports(
    state_dir: &Path,
    dir: &Path,
    preferred: Option<(u16, u16)>,
) -> anyhow::Result<(Child, u16, u16)> {
    let mut last_error = None;
    for attempt in 0..START_ATTEMPTS {
        let (server, ctrl) = match preferred {
            Some(ports) if attempt < 2 => ports,
            _ => ports::free_port_pair().context("finding free ports for swtpm")?,
        };
        match spawn(state_dir, dir, server, ctrl) {
            Ok(child) => return Ok((child, server, ctrl)),
            Err(err) => {
                if Some((server, ctrl)) != preferred {
                    ports::release(&[server, ctrl]);
                }
                last_error = Some(err);
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!(
            "swtpm did not start after {START_ATTEMPTS} attempts"
        )))
}

/// Spawns `swtpm socket` and waits until it listens on `server`.
fn spawn(state_dir: &Path, dir: &Path, server: u16, ctrl: u16) -> anyhow::Result<Child> {
    let log_path = dir.join("swtpm.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log_err = log.try_clone().context("duplicating the log file handle")?;
    let mut child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", state_dir.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={server},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .context("spawning swtpm")?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for swtpm")? {
            bail!(
                "swtpm exited with {status} on ports {server}/{ctrl}: {}",
                read_log(&log_path)
            );
        }
        // Another process may have grabbed the port: only our child's own
        // listening socket counts.
        let ours = ports::listened_by(child.id(), server).unwrap_or(true);
        if ours && TcpStream::connect((Ipv4Addr::LOCALHOST, server)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "swtpm did not listen on port {server} within {READY_TIMEOUT:?}: {}",
                read_log(&log_path)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command`, failing with its stdout and stderr if it exits non-zero.
fn run(command: &mut Command) -> anyhow::Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} exited with {}: stderr: {}; stdout: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(output)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| format!("(no log: {err})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const ZERO_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn extended(old_hex: &str, digest_hex: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(hex::decode(old_hex).unwrap());
        hasher.update(hex::decode(digest_hex).unwrap());
        hex::encode(hasher.finalize())
    }

    #[test]
    fn two_instances_are_independent() {
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(SwTpm::start);
            let b = scope.spawn(SwTpm::start);
            (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
        });
        assert_ne!(a.tcti(), b.tcti());
        assert_ne!(a.state_dir(), b.state_dir());
        assert_ne!(a.local_ca_certs(), b.local_ca_certs());

        let digest = hex::encode(Sha256::digest(b"measured thing"));
        assert_eq!(a.pcr_read("sha256", 16).unwrap(), ZERO_SHA256);
        a.pcr_extend(16, "sha256", &digest).unwrap();
        assert_eq!(
            a.pcr_read("sha256", 16).unwrap(),
            extended(ZERO_SHA256, &digest)
        );
        assert_eq!(b.pcr_read("sha256", 16).unwrap(), ZERO_SHA256);
    }

    #[test]
    fn restart_resets_pcrs_and_keeps_state() {
        let mut tpm = SwTpm::start().unwrap();
        let ek_cert = tpm.ek_cert_der().unwrap();
        let digest = hex::encode(Sha256::digest(b"boot loader"));
        tpm.pcr_extend(7, "sha256", &digest).unwrap();
        assert_eq!(
            tpm.pcr_read("sha256", 7).unwrap(),
            extended(ZERO_SHA256, &digest)
        );

        let pid_before = tpm.child.id();
        tpm.restart().unwrap();
        assert_ne!(tpm.child.id(), pid_before);
        assert_eq!(tpm.pcr_read("sha256", 7).unwrap(), ZERO_SHA256);
        // Same TPM after the reboot: the manufactured EK certificate survives.
        assert_eq!(tpm.ek_cert_der().unwrap(), ek_cert);
    }

    #[test]
    fn ek_certificate_and_local_ca_exist() {
        let tpm = SwTpm::start().unwrap();
        let public = tpm
            .run_tool("tpm2_nvreadpublic", [EK_CERT_RSA_NV_INDEX])
            .unwrap();
        assert!(String::from_utf8_lossy(&public.stdout).contains("0x1c00002:"));

        let der = tpm.ek_cert_der().unwrap();
        // A DER certificate is a SEQUENCE with a two-byte long-form length.
        assert_eq!(der[..2], [0x30, 0x82]);
        let len = usize::from(u16::from_be_bytes([der[2], der[3]]));
        assert!(der.len() >= len + 4, "EK certificate truncated");

        let certs = tpm.local_ca_certs();
        assert_eq!(certs.len(), 2);
        for cert in &certs {
            assert!(cert.starts_with(tpm.dir.path()), "CA outside the instance");
            let pem = std::fs::read_to_string(cert).unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{cert:?}");
            assert!(
                pem.trim_end().ends_with("-----END CERTIFICATE-----"),
                "{cert:?}"
            );
        }
        assert_ne!(
            std::fs::read(&certs[0]).unwrap(),
            std::fs::read(&certs[1]).unwrap()
        );
    }

    #[test]
    fn drop_kills_swtpm_and_removes_state() {
        let tpm = SwTpm::start().unwrap();
        let pid = tpm.child.id();
        let dir = tpm.dir.path().to_path_buf();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(tpm);
        // Reaped, so the pid no longer names a process (not even a zombie).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(!dir.exists());
    }

    #[test]
    fn bad_extend_digest_is_an_error() {
        let tpm = SwTpm::start().unwrap();
        assert!(tpm.pcr_extend(16, "sha256", "not hex").is_err());
        assert!(tpm.pcr_extend(16, "sha256", "").is_err());
        // Wrong length for the bank: the TPM tool refuses it.
        assert!(tpm.pcr_extend(16, "sha256", "abcd").is_err());
        assert_eq!(tpm.pcr_read("sha256", 16).unwrap(), ZERO_SHA256);
        assert!(tpm.pcr_read("sha1", 0).is_err(), "sha1 bank is not active");
    }
}
