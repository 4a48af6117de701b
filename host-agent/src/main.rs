//! `host-agent --config FILE`: attest this host until SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "Attests this host's TPM 2.0 to the attestation server"
)]
struct Args {
    /// TOML configuration file; HOST_AGENT_* environment variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match host_agent::config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-agent: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // tss-esapi logs every context open/close at info level: keep it quiet.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,tss_esapi=warn"));
    // Fails only if a subscriber is already installed, which cannot happen here.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("host-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(host_agent::run(config, host_agent::termination_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ host_agent::Error::Config { .. }) => {
            tracing::error!(error = %e, "invalid configuration");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %e, "host agent failed");
            ExitCode::FAILURE
        }
    }
}
