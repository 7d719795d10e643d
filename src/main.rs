//! The `splitserve` binary: parse, set up logging, call the library.

use std::process::ExitCode;

use clap::Parser;
use splitserve::config::{Cli, Command, EXIT_CONFIG, ServeArgs};
use splitserve::plan::ThreadPlan;
use splitserve::{Listeners, telemetry};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
    }
}

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("splitserve: {msg}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn serve(args: ServeArgs) -> ExitCode {
    telemetry::init_logging(args.log_format);
    if let Err(e) = args.validate() {
        return config_error(e);
    }
    let plan = match ThreadPlan::from_args(&args) {
        Ok(plan) => plan,
        Err(e) => return config_error(e),
    };
    if plan.oversubscribed {
        tracing::warn!(%plan, "thread plan oversubscribes the CPU budget (--allow-oversubscription)");
    }
    tracing::info!(%plan, planned_threads = plan.planned_threads(), "thread plan");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.io_threads)
        .max_blocking_threads(1)
        .thread_name("splitserve-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("splitserve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let grpc = tokio::net::TcpListener::bind(args.grpc_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.grpc_addr))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        splitserve::run(args, plan, Listeners { grpc }, shutdown)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("splitserve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C) starts the drain.
async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "signal received");
    token.cancel();
}
