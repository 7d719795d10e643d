//! Running `probe` and `bench` from their command lines: the runtime, the
//! report (JSON or text) and the exit code, shared by both binaries.

use std::process::ExitCode;

use crate::args::{BenchArgs, ProbeArgs};

/// A small runtime for a client command.
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    built.map_err(|e| {
        eprintln!("splitserve: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Prints a report as JSON or text, or the error; the exit code says which.
pub fn report<E: std::fmt::Display>(
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

/// `bench`: exits 1 when more requests failed than `--max-error-rate`.
pub fn bench(args: BenchArgs) -> ExitCode {
    let json = args.json;
    let max_error_rate = args.max_error_rate;
    let config = args.into_config();
    let rt = match runtime(config.client_threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(crate::bench::run(&config));
    let failed = result
        .as_ref()
        .ok()
        .filter(|r| r.error_rate > max_error_rate)
        .map(|r| r.error_rate);
    let code = report(
        "bench",
        json,
        result.map(|r| (serde_json::to_string(&r), r.render())),
    );
    match failed {
        Some(rate) => {
            eprintln!(
                "splitserve bench: {:.1}% of requests failed, more than --max-error-rate {max_error_rate}",
                rate * 100.0
            );
            ExitCode::FAILURE
        }
        None => code,
    }
}

/// `probe`: exits 0 when the service is SERVING, 1 otherwise.
pub fn probe(args: ProbeArgs) -> ExitCode {
    let args = args.into_config();
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(crate::probe::probe(&args)) {
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
