//! A private swtpm local CA per TPM instance.
//!
//! swtpm_setup defaults to /etc/swtpm_setup.conf, whose local CA lives in the
//! shared /var/lib/swtpm-localca; concurrent tests would then contend for its
//! lock and share one CA. Pointing `--config` at files in the instance's own
//! directory keeps the CA's key and certificates private to the instance.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Config files and CA state of one local CA, all under one directory.
#[derive(Debug, Clone)]
pub(crate) struct LocalCa {
    /// The swtpm_setup.conf to pass with `swtpm_setup --config`.
    pub setup_conf: PathBuf,
    /// The CA's state directory (signing key, certificates, serial).
    pub statedir: PathBuf,
}

impl LocalCa {
    /// Writes the config files into `dir`; swtpm_localca creates the CA's
    /// keys and certificates there on first use.
    pub fn create(dir: &Path) -> anyhow::Result<LocalCa> {
        let statedir = dir.join("localca");
        std::fs::create_dir_all(&statedir)
            .with_context(|| format!("creating {}", statedir.display()))?;

        let localca_conf = dir.join("swtpm-localca.conf");
        write(
            &localca_conf,
            &format!(
                "statedir = {state}\n\
                 signingkey = {state}/signkey.pem\n\
                 issuercert = {state}/issuercert.pem\n\
                 certserial = {state}/certserial\n",
                state = statedir.display()
            ),
        )?;

        // Same values as Debian's /etc/swtpm-localca.options, but our own copy
        // so the result does not depend on the host's configuration.
        let localca_options = dir.join("swtpm-localca.options");
        write(
            &localca_options,
            "--platform-manufacturer swtpm-test\n--platform-version 2.1\n--platform-model test\n",
        )?;

        let setup_conf = dir.join("swtpm_setup.conf");
        write(
            &setup_conf,
            &format!(
                "create_certs_tool = swtpm_localca\n\
                 create_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\n\
                 active_pcr_banks = sha256\n",
                localca_conf.display(),
                localca_options.display()
            ),
        )?;

        Ok(LocalCa {
            setup_conf,
            statedir,
        })
    }

    /// The root CA certificate, then the intermediate (issuer) certificate
    /// that signs the EK and platform certificates; both PEM.
    pub fn certs(&self) -> Vec<PathBuf> {
        vec![
            self.statedir.join("swtpm-localca-rootca-cert.pem"),
            self.statedir.join("issuercert.pem"),
        ]
    }
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
