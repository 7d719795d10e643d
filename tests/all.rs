//! Every integration test in one binary: each file below links the library and
//! libtorch once here instead of once per file, which keeps a cold `make test`
//! several minutes shorter. The files stay where they were; run one file's
//! tests with `cargo test --release --test integration -- limits::`.
#![allow(clippy::unwrap_used)]

mod common;

#[path = "admin.rs"]
mod admin;
#[path = "architecture.rs"]
mod architecture;
#[path = "compute.rs"]
mod compute;
#[path = "device.rs"]
mod device;
#[path = "engine.rs"]
mod engine;
#[path = "gpu.rs"]
mod gpu;
#[path = "limits.rs"]
mod limits;
#[path = "otlp.rs"]
mod otlp;
#[path = "python_oracle.rs"]
mod python_oracle;
#[path = "training.rs"]
mod training;
