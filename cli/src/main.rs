//! `trellis`: the all-in-one node supervisor (`trellis up`) and the operator's CLI.
#![deny(unsafe_code)]

mod bench;
mod bus_credentials;
mod child;
mod output;
mod private_bus;
mod probe;
mod restarts;
mod status;
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
        Command::Bench(args) => {
            let socket = config.endpoint(trellis_common::ServiceKind::Gateway).socket;
            runtime.block_on(bench::run(args, socket))?;
        }
        Command::BusCredentials(args) => bus_credentials::run(&args, &config)?,
        Command::Status { json } => {
            let healthy = runtime.block_on(status::run(&config, json));
            if !healthy {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
