//! `disparo`: one binary, several modes (see docs/architecture.md). This file only parses the
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
    /// Reconcile Campaigns and Channels (leader-elected).
    Controller(disparo::controller::ControllerArgs),
    /// Send one batch of one campaign (run by the campaign's Indexed Job).
    Send(disparo::sender::SendArgs),
    /// Receive provider webhooks and apply delivery and read receipts.
    Webhook(disparo::webhook::WebhookArgs),
    /// Simulate the Meta Cloud API and the Evolution API for rehearsals and tests.
    Sandbox(disparo::sandbox::SandboxArgs),
    /// Show a campaign: progress, counts, rates, ETA, retries, errors, recent events.
    Status(disparo::cli::plugin::StatusArgs),
    /// Pause a campaign (suspends its sending Job).
    Pause(disparo::cli::plugin::Target),
    /// Resume a campaign: paused by a person or by the failure threshold, stopped by the
    /// provider (its message or its channel), or Failed with messages left.
    Resume(disparo::cli::plugin::Target),
    /// Cancel a campaign for good.
    Cancel(disparo::cli::plugin::CancelArgs),
    /// Create a campaign aimed at the failed messages of another.
    RetryFailed(disparo::cli::plugin::RetryFailedArgs),
    /// Export a campaign's messages, one row per recipient, as CSV or JSON lines
    /// (phone numbers masked unless --unmask).
    Export(disparo::cli::export::ExportArgs),
    /// Measure the store, the sender or the webhook and print the figures.
    Bench(disparo::bench::BenchArgs),
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
    // Installed as `kubectl-disparo`, kubectl runs it as `kubectl disparo ...`.
    let invoked_as_plugin = std::env::args_os()
        .next()
        .and_then(|a| PathBuf::from(a).file_name().map(|n| n.to_string_lossy().starts_with("kubectl-")))
        .unwrap_or(false);
    let cli = if invoked_as_plugin {
        Cli::parse_from(std::iter::once("kubectl disparo".into()).chain(std::env::args_os().skip(1)))
    } else {
        Cli::parse()
    };
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
        Command::Controller(args) => disparo::controller::run(args, telemetry::shutdown_on_signals()).await?,
        Command::Send(args) => {
            let code = disparo::sender::run(args, telemetry::shutdown_on_signals()).await?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        Command::Webhook(args) => disparo::webhook::run(args, telemetry::shutdown_on_signals()).await?,
        Command::Sandbox(args) => disparo::sandbox::run(args).await?,
        Command::Status(args) => disparo::cli::plugin::status(args).await?,
        Command::Pause(target) => disparo::cli::plugin::pause(target).await?,
        Command::Resume(target) => disparo::cli::plugin::resume(target).await?,
        Command::Cancel(args) => disparo::cli::plugin::cancel(args).await?,
        Command::RetryFailed(args) => disparo::cli::plugin::retry_failed(args).await?,
        Command::Export(args) => disparo::cli::export::run(args).await?,
        Command::Bench(args) => disparo::bench::run(args).await?,
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
