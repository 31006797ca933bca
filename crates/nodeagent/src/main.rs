//! `disparo-nodeagent`: runs the Pods of a local control plane as processes of this
//! machine (see the library's documentation for what it does and leaves out). Only
//! the tests and `scripts/demo` start it; it is no part of the `disparo` product.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use disparo_nodeagent::NodeAgentArgs;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "disparo-nodeagent",
    version,
    about = "Stand in for the kubelet and scheduler of a local control plane: run Pods as local processes"
)]
struct Cli {
    #[command(flatten)]
    args: NodeAgentArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Human-readable lines on stderr; `RUST_LOG` overrides the default `info` level.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // kube's TLS goes through rustls, which needs a process-wide crypto provider; one
    // already installed is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT; the agent then stops every process it
/// started and marks its node `NotReady` before returning.
async fn run(args: NodeAgentArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        trigger.cancel();
    });
    disparo_nodeagent::run(args, shutdown).await
}
