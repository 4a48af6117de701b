//! `attestctl`: admin CLI; prints JSON answers on stdout.
use attestation_server::ctl::{self, Cli, CtlError};
use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match ctl::run(cli).await {
        Ok(value) => {
            // A closed pipe (`attestctl … | head`) is not worth a panic.
            use std::io::Write;
            let text = serde_json::to_string_pretty(&value).unwrap_or_default();
            let _ = writeln!(std::io::stdout(), "{text}");
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
