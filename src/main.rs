//! The `splitserve` binary: parse, set up logging, call the library.

use std::process::ExitCode;

use clap::Parser;
use splitserve::cli::{BenchArgs, Cli, Command, DiagnoseArgs, EXIT_CONFIG, ProbeArgs, ServeArgs};
use splitserve::{Listeners, ServerConfig, telemetry};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Bench(args) => bench(*args),
        Command::Probe(args) => probe(args),
        Command::Diagnose(args) => diagnose(*args),
    }
}

/// A small runtime for the client-side subcommands.
fn client_runtime(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("splitserve: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn bench(args: BenchArgs) -> ExitCode {
    let json = args.json;
    let config = args.into_config();
    let runtime = match client_runtime(config.client_threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(splitserve::bench::run(&config));
    report(
        "bench",
        json,
        result.map(|r| (serde_json::to_string(&r), r.render())),
    )
}

/// Prints a report as JSON or text, or the error; the exit code says which.
fn report<E: std::fmt::Display>(
    command: &str,
    json: bool,
    result: Result<(serde_json::Result<String>, String), E>,
) -> ExitCode {
    match result {
        Ok((as_json, text)) => {
            if json {
                println!("{}", as_json.unwrap_or_default());
            } else {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("splitserve {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn diagnose(args: DiagnoseArgs) -> ExitCode {
    let json = args.json;
    let result = splitserve::diagnose::run(&args.into_config());
    report(
        "diagnose",
        json,
        result.map(|r| (serde_json::to_string(&r), r.render())),
    )
}

fn probe(args: ProbeArgs) -> ExitCode {
    let args = args.into_config();
    let runtime = match client_runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(splitserve::client::probe(&args)) {
        Ok(status) => {
            println!("{} {:?}: {status}", args.addr, args.service);
            if status == "SERVING" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("splitserve probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("splitserve: {msg}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn serve(args: ServeArgs) -> ExitCode {
    let telemetry = args.telemetry_config();
    let endpoint = telemetry::otel::otlp_endpoint(telemetry.otlp_endpoint.as_deref());
    let guard = match telemetry::otel::init(telemetry.log_format, endpoint.as_deref()) {
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
        let admin = tokio::net::TcpListener::bind(config.metrics_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {} (--metrics-addr): {e}",
                    config.metrics_addr
                )
            })?;
        let http = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--http-addr): {e}", config.http_addr))?;
        tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, metrics = %admin.local_addr()?, "listening");
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let listeners = Listeners {
            grpc,
            admin: Some(admin),
            http: Some(http),
        };
        splitserve::run(config, listeners, shutdown)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref(), Some(splitserve::RunError::Config(_))) => {
            tracing::error!("{e:#}");
            config_error(e)
        }
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
