//! `disparo`: one binary, several modes (see DESIGN.md). This file only parses the
//! command line and calls one `run` per mode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use disparo::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(name = "disparo", version, about = "WhatsApp messaging campaigns as Kubernetes custom resources")]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "DISPARO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations (safe to run concurrently).
    Migrate(MigrateArgs),
    /// Manage contacts.
    #[command(subcommand)]
    Contacts(ContactsCommand),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crd(CrdArgs),
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Debug, Subcommand)]
enum ContactsCommand {
    /// Import contacts from a CSV or JSON-lines file.
    Import(disparo::cli::import::ImportArgs),
}

#[derive(Debug, clap::Args)]
struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    telemetry::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate(args) => {
            let pool = disparo::store::connect(&args.database_url, 2).await.context("connecting to Postgres")?;
            disparo::store::migrate(&pool).await.context("applying migrations")?;
            eprintln!("migrations applied");
        }
        Command::Contacts(ContactsCommand::Import(args)) => disparo::cli::import::run(args).await?,
        Command::Crd(args) => match args.out_dir {
            None => print!("{}", disparo::api::crds_yaml()?),
            Some(dir) => {
                for (name, yaml) in disparo::api::crd_files()? {
                    let path = dir.join(name);
                    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
