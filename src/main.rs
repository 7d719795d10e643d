//! The `splitserve` binary: parse, set up logging, call the library.

use std::process::ExitCode;

use clap::Parser;
use splitserve::cli::{Cli, Command, DiagnoseArgs, EXIT_CONFIG, ServeArgs};
use splitserve::{Listeners, ServerConfig, telemetry};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Bench(args) => splitserve_client::commands::bench(*args),
        Command::Probe(args) => splitserve_client::commands::probe(args),
        Command::Diagnose(args) => diagnose(*args),
    }
}

fn diagnose(args: DiagnoseArgs) -> ExitCode {
    let json = args.json;
    let result = splitserve::diagnose::run(&args.into_config());
    splitserve_client::commands::report(
        "diagnose",
        json,
        result.map(|r| (serde_json::to_string(&r), r.render())),
    )
}

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("splitserve: {msg}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn serve(args: ServeArgs) -> ExitCode {
    let telemetry = args.telemetry_config();
    let endpoint = telemetry::otel::otlp_endpoint(telemetry.otlp_endpoint.as_deref());
    let guard = match telemetry::otel::init(
        telemetry.log_format,
        endpoint.as_deref(),
        telemetry.access_log,
    ) {
        Ok(guard) => guard,
        Err(e) => return config_error(e),
    };
    let code = match args.into_config() {
        Ok(config) => serve_with_telemetry(config),
        Err(e) => config_error(e),
    };
    guard.shutdown();
    code
}

fn serve_with_telemetry(config: ServerConfig) -> ExitCode {
    let plan = config.engine.plan;
    if plan.oversubscribed {
        tracing::warn!(%plan, "thread plan oversubscribes the CPU budget (--allow-oversubscription)");
    }
    tracing::info!(%plan, planned_threads = plan.planned_threads(), "thread plan");
    if let Some(why) =
        splitserve::plan::cuda_workers_reason(&config.threads, splitserve::plan::cuda_starts)
    {
        tracing::info!(
            workers = plan.workers,
            "{why}: automatic workers are at most {} (their forwards share one CUDA \
             stream; more would only queue there, each holding its own device memory)",
            splitserve::plan::CUDA_WORKERS
        );
    }
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
        let grpc = tokio::net::TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.grpc_addr))?;
        let admin = match config.metrics_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {addr} (--metrics-addr): {e}")
            })?),
            None => None,
        };
        let http = match config.http_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {addr} (--http-addr): {e}")
            })?),
            None => None,
        };
        let local = |l: &Option<tokio::net::TcpListener>| {
            l.as_ref()
                .and_then(|l| l.local_addr().ok())
                .map_or_else(|| "off".to_string(), |a| a.to_string())
        };
        tracing::info!(grpc = %grpc.local_addr()?, http = %local(&http), metrics = %local(&admin), "listening");
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let listeners = Listeners { grpc, admin, http };
        splitserve::run(config, listeners, shutdown)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The log (stderr) has it once; printing it again would say it twice.
        Err(e) if matches!(e.downcast_ref(), Some(splitserve::RunError::Config(_))) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(e) => {
            tracing::error!("{e:#}");
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
