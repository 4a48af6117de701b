//! `attestctl`: admin CLI; prints JSON answers on stdout.
use attestation_server::ctl::{self, Cli, CtlError};
use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match ctl::run(cli).await {
        Ok(value) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attestctl: {e}");
            match e {
                CtlError::Local(attestation_server::error::Error::Config { .. }) => {
                    ExitCode::from(2)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}
