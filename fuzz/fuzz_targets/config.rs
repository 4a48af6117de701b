//! Configuration files the operator writes: the server's and the agent's
//! TOML, through their real loaders (figment layering, path resolution,
//! validation). The loaders take a path, so the input is written to a
//! per-process scratch file first. The first byte picks the loader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("attest-fuzz-config-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir.join("config.toml")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let path = scratch();
    if std::fs::write(path, rest).is_err() {
        return;
    }
    if which % 2 == 0 {
        let _ = attestation_server::config::ServerConfig::load(Some(path));
    } else {
        let _ = host_agent::config::load(Some(path));
    }
});
