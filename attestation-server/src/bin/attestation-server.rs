//! `attestation-server --config FILE`
use attestation_server::config::ServerConfig;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

// mimalloc, not glibc's malloc: the attestation path allocates and frees
// many short-lived buffers (TLS records, HTTP bodies, JSON) across threads,
// and glibc's malloc was a sixth of the server's CPU at load
// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "attestation-server",
    about = "Trusted compute pool attestation server"
)]
struct Args {
    /// TOML configuration (see `attestctl init`); ATTEST_SERVER_* variables override it.
    #[arg(long, env = "ATTEST_SERVER_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ServerConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("attestation-server: {e}");
            return ExitCode::from(2);
        }
    };
    attestation_server::logging::init(config.log_format);
    match attestation_server::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attestation-server: {e}");
            // Configuration found unusable at start (e.g. an ek_ca file) is
            // still a configuration error.
            match e {
                attestation_server::error::Error::Config { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
