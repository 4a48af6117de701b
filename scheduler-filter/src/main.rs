//! `scheduler-filter --config FILE [--require trusted|untrusted] HOST...`
//!
//! Prints the passing hosts on stdout, one per line, and why each other host
//! was denied on stderr. Exit status: 0 when at least one host passes, 1
//! when none does, 2 on a configuration or usage error.
#![forbid(unsafe_code)]

use clap::{Parser, ValueEnum};
use proto::wire::Trust;
use scheduler_filter::{load, TrustFilter};
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_NONE_PASS: u8 = 1;
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    version,
    about = "Keep workloads on hosts the attestation server trusts"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Which verdict a host needs to be printed.
    #[arg(long, value_enum, default_value_t = Require::Trusted)]
    require: Require,
    /// Candidate host names.
    #[arg(required = true, value_name = "HOST")]
    hosts: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Require {
    Trusted,
    Untrusted,
}

impl From<Require> for Trust {
    fn from(r: Require) -> Self {
        match r {
            Require::Trusted => Trust::Trusted,
            Require::Untrusted => Trust::Untrusted,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap exits with status 2 on a usage error.
    let args = Args::parse();
    let filter = match load(Some(&args.config)).and_then(|c| TrustFilter::new(&c)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("scheduler-filter: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let decisions = filter.decide(&args.hosts, args.require.into()).await;
    let mut passed = 0usize;
    for d in &decisions {
        if d.allowed {
            passed += 1;
            println!("{}", d.host);
        } else {
            eprintln!("{}: {}", d.host, d.reason);
        }
    }
    if passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NONE_PASS)
    }
}
