//! Checks that the external programs the harness drives are installed.

use std::ffi::OsStr;
use std::path::Path;

/// Programs [`crate::SwTpm`] cannot work without.
pub const REQUIRED_TOOLS: &[&str] = &[
    "swtpm",
    "swtpm_setup",
    "swtpm_localca",
    "tpm2_pcrextend",
    "tpm2_pcrread",
    "tpm2_nvreadpublic",
    "tpm2_nvread",
    "tpm2_shutdown",
];

/// Fails with a message naming every missing tool and the Debian packages
/// that provide them.
pub fn require_tools() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing = missing_tools(&path, REQUIRED_TOOLS);
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "missing tool(s) on PATH: {}; install them with `apt-get install swtpm swtpm-tools \
         tpm2-tools` (or run scripts/setup.sh)",
        missing.join(", ")
    )
}

/// The subset of `tools` not found as executable files in the `PATH`-style
/// list `path`.
pub(crate) fn missing_tools<'a>(path: &OsStr, tools: &[&'a str]) -> Vec<&'a str> {
    tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(path).any(|dir| is_executable(&dir.join(tool))))
        .collect()
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn installed_tools_are_found() {
        require_tools().unwrap();
    }

    #[test]
    fn missing_tools_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("swtpm");
        std::fs::write(&present, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&present, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Present but not executable: must count as missing.
        std::fs::write(dir.path().join("swtpm_setup"), "").unwrap();

        let missing = missing_tools(
            dir.path().as_os_str(),
            &["swtpm", "swtpm_setup", "tpm2_pcrextend"],
        );
        assert_eq!(missing, vec!["swtpm_setup", "tpm2_pcrextend"]);
    }
}
