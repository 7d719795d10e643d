//! `splitserve-client`: `probe` and `bench` without libtorch, for container
//! HEALTHCHECKs, Kubernetes exec probes and Helm tests.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use splitserve_client::args::{BenchArgs, ProbeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "splitserve-client",
    version,
    about = "splitserve's probe and load generator, without libtorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a grpc.health.v1 service: exit 0 when SERVING, 1 otherwise.
    Probe(ProbeArgs),
    /// Load-test any server that speaks splitlearn.comm.ComputeService (closed loop).
    Bench(Box<BenchArgs>),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Probe(args) => splitserve_client::commands::probe(args),
        Command::Bench(args) => splitserve_client::commands::bench(*args),
    }
}
