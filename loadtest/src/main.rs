//! `tokenfan-loadtest`: measures what an SSE connection costs tokenfan (memory, CPU per
//! delivered token, fan-out latency) and checks that no token is lost, from a few hundred
//! connections in CI to a million on a machine that allows it. See loadtest/README.md.

mod client;
mod fleet;
mod floor;
mod gateway;
mod metrics;
mod report;
mod run;
mod scenario;
mod store;
mod worker;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario against a spawned or running gateway and report.
    Run(Box<run::RunArgs>),
    /// The kernel's floor for a fan-out here: bare send(2) calls to N loopback sockets.
    Floor(floor::FloorArgs),
    /// Internal: one client worker process, driven over stdio by `run`.
    #[command(hide = true)]
    Worker,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker => worker::main(),
        Command::Floor(args) => floor::main(&args),
        Command::Run(args) => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("coordinator runtime")?;
            let result = runtime.block_on(run::run(&args, command))?;
            println!("{}", result.markdown());
            let failures = result.failures();
            if failures.is_empty() {
                Ok(())
            } else {
                anyhow::bail!(
                    "check failed ({}): see the summary above",
                    failures.join(", ")
                )
            }
        }
    }
}
