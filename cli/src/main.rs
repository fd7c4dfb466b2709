//! `trellis`: the all-in-one node supervisor (`trellis up`) and the operator's CLI.
#![deny(unsafe_code)]

mod bench;
mod bus_credentials;
mod child;
mod control;
mod notifications;
mod output;
mod private_bus;
mod probe;
mod restarts;
mod status;
mod supervise;
mod up;
mod up_metrics;

use clap::{Parser, Subcommand};
use trellis_common::service::{ConfigArgs, VERSION};

#[derive(Debug, Parser)]
#[command(name = "trellis", version = VERSION, about = "Trellis, a Kubernetes container runtime")]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole node: a private NATS when no bus is configured, then storage,
    /// network, image, runtime and gateway, restarted when they die.
    Up,
    /// Show each service's health, version, pid, uptime, metrics address, socket and
    /// bus connection.
    Status {
        /// One JSON document, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Replace a service's process through `trellis up`, without its callers noticing:
    /// the gateway's successor serves before it drains; a service with a record store
    /// drains and hands over while callers wait.
    Restart {
        /// gateway, runtime, image, storage or network.
        service: String,
    },
    /// Like restart, onto another binary; if it does not become ready, the old one
    /// serves again.
    Upgrade {
        service: String,
        /// The new binary: a root-owned executable no one else can write.
        #[arg(long)]
        binary: std::path::PathBuf,
    },
    /// Time pod and container lifecycles against a CRI endpoint (this node's, or another runtime's).
    Bench(bench::BenchArgs),
    /// Write this node's credentials for a bus outside `trellis up`: an nkey seed per
    /// service and a nats-server configuration with their users and permissions.
    BusCredentials(bus_credentials::BusCredentialsArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.source().load()?;
    if !matches!(cli.command, Command::Up) {
        // `up` logs them once its logging is set up; the other commands have none.
        for notice in &config.notices {
            output::errln!("warning: {notice}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Up => runtime.block_on(up::run(&cli.config, config))?,
        Command::Bench(args) => runtime.block_on(bench::run(args, &config))?,
        Command::BusCredentials(args) => bus_credentials::run(&args, &config)?,
        Command::Restart { service } => {
            let request = control::Request::Restart { service };
            runtime.block_on(replace(&config, &request))?;
        }
        Command::Upgrade { service, binary } => {
            let binary = std::path::absolute(&binary)?;
            let request = control::Request::Upgrade { service, binary };
            runtime.block_on(replace(&config, &request))?;
        }
        Command::Status { json } => {
            let healthy = runtime.block_on(status::run(&config, json));
            if !healthy {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// Orders a replacement from this node's `trellis up` and says how it went.
async fn replace(
    config: &trellis_common::Config,
    request: &control::Request,
) -> anyhow::Result<()> {
    let done = control::order(&config.node.run_dir, request).await?;
    output::outln!(
        "{}: pid {} -> {} ({}, {} ms), {}",
        done.service,
        done.old_pid,
        done.new_pid,
        done.takeover,
        done.millis,
        done.program
    );
    Ok(())
}
