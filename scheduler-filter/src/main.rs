//! `scheduler-filter --config FILE [--require trusted|untrusted] HOST...`
//!   Prints the passing hosts on stdout, one per line, and why each other
//!   host was denied on stderr. Exit status: 0 when at least one host
//!   passes, 1 when none does, 2 on a configuration or usage error.
//!
//! `scheduler-filter serve --config FILE [--listen ADDR]`
//!   Runs the Kubernetes scheduler extender and the push receiver until
//!   SIGTERM. Exit status 2 when it cannot start.
//!
//! `scheduler-filter verify-token --jwks FILE TOKEN`
//!   Verifies a host-trust token offline; prints its claims as JSON (exit 0)
//!   or why it was rejected (exit 1). Exit status 2 on an unreadable key set.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
use proto::token::Jwks;
use proto::wire::Trust;
use scheduler_filter::{load, server, TokenVerifier, TrustFilter};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_NONE_PASS: u8 = 1;
const EXIT_REJECTED: u8 = 1;
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    version,
    about = "Keep workloads on hosts the attestation server trusts",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Which verdict a host needs to be printed.
    #[arg(long, value_enum, default_value_t = Require::Trusted)]
    require: Require,
    /// Candidate host names.
    #[arg(required = true, value_name = "HOST")]
    hosts: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kubernetes scheduler extender (filter, prioritize, notify).
    Serve {
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Listen address; overrides `extender.listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Verify a host-trust token offline against a JWK set file.
    VerifyToken {
        /// The server's `/.well-known/jwks.json`, saved to a file.
        #[arg(long, value_name = "FILE")]
        jwks: PathBuf,
        #[arg(value_name = "TOKEN")]
        token: String,
    },
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

#[tokio::main]
async fn main() -> ExitCode {
    // clap exits with status 2 on a usage error.
    let args = Args::parse();
    match args.command {
        Some(Command::Serve { config, listen }) => serve(config, listen).await,
        Some(Command::VerifyToken { jwks, token }) => verify_token(jwks, &token).await,
        None => check(args.config.unwrap_or_default(), args.require, &args.hosts).await,
    }
}

async fn check(config: PathBuf, require: Require, hosts: &[String]) -> ExitCode {
    let filter = match load(Some(&config)).and_then(|c| TrustFilter::new(&c)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("scheduler-filter: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let decisions = filter.decide(hosts, require.into()).await;
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

async fn serve(config: PathBuf, listen: Option<SocketAddr>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match load(Some(&config)) {
        Ok(c) => server::run(&c, listen, server::shutdown_signal()).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scheduler-filter: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn verify_token(jwks: PathBuf, token: &str) -> ExitCode {
    let keys: Jwks = match std::fs::read(&jwks)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(k) => k,
        Err(e) => {
            eprintln!("scheduler-filter: key set {}: {e}", jwks.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match TokenVerifier::from_jwks(keys)
        .verify_token(token.trim())
        .await
    {
        Ok(claims) => match serde_json::to_string_pretty(&claims) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("scheduler-filter: {e}");
                ExitCode::from(EXIT_REJECTED)
            }
        },
        Err(e) => {
            eprintln!("scheduler-filter: {e}");
            ExitCode::from(EXIT_REJECTED)
        }
    }
}
