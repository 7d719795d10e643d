//! splitserve's clients, without libtorch: `probe` (grpc.health.v1, for exec
//! probes and container HEALTHCHECKs) and `bench` (a closed-loop load
//! generator for any splitlearn.comm.ComputeService). A small crate of its own
//! so that the `splitserve-client` binary starts in milliseconds with a few MB;
//! `splitserve probe` and `splitserve bench` are the same code.
//!
//! - [`args`]: their command lines (clap), converting into the plain configs.
//! - [`probe`]: connecting, and the health check.
//! - [`bench`]: the load generator and its report.
//! - [`commands`]: running either and turning the outcome into an exit code.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod args;
pub mod bench;
pub mod commands;
pub mod probe;

/// Client stubs for `splitlearn.comm` (generated into OUT_DIR).
#[allow(clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("splitlearn.comm");
}

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
