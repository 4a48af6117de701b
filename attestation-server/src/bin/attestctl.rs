//! `attestctl`: admin CLI; prints JSON answers on stdout. `check` is a
//! monitoring plugin instead: one status line and the plugin exit code.
use attestation_server::ctl::{self, check, Cli, Command, CtlError};
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

// mimalloc, not glibc's malloc: the attestation path allocates and frees
// many short-lived buffers (TLS records, HTTP bodies, JSON) across threads,
// and glibc's malloc was a sixth of the server's CPU at load
// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A monitoring plugin with bad arguments is UNKNOWN (3), not clap's 2
        // (which a monitor would read as CRITICAL).
        Err(e) if std::env::args().any(|a| a == "check") && e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(check::State::Unknown.exit_code());
        }
        Err(e) => e.exit(),
    };
    if let Command::Check(args) = &cli.command {
        let report = check::run(cli.config.as_deref(), args).await;
        let _ = writeln!(std::io::stdout(), "{}", report.line);
        return ExitCode::from(report.state.exit_code());
    }
    match ctl::run(cli).await {
        Ok(value) => {
            // A closed pipe (`attestctl … | head`) is not worth a panic.
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
