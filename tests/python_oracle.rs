//! The Python suite as an oracle for mutation testing (`make mutants`): a
//! selection of tests/python run against the binary this very build made, so
//! that the guarantees only the real clients check (tokens, TLS, the model
//! repository over tritonclient) count against each mutant. Ignored by a plain
//! `cargo test`: `make test` runs tests/python itself.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

/// The pytest arguments: files, `-k` expressions (split on whitespace; a `-k`
/// expression of several words is joined by `+` in the variable, e.g. `token+or+tls`).
const SELECTION: &str = "SPLITSERVE_MUTANTS_PYTEST";

#[test]
#[ignore = "run by make mutants with SPLITSERVE_MUTANTS_PYTEST set; make test runs tests/python directly"]
fn python_selection_passes() {
    let Ok(selection) = std::env::var(SELECTION) else {
        panic!("{SELECTION} is not set: make mutants sets it per module");
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The binary the Python tests start is the one this build just linked.
    let built = PathBuf::from(env!("CARGO_BIN_EXE_splitserve"));
    assert_eq!(
        built.canonicalize().unwrap(),
        root.join("target/release/splitserve")
            .canonicalize()
            .unwrap(),
        "the Python tests start target/release/splitserve: build with --release in this tree"
    );
    let args: Vec<String> = selection
        .split_whitespace()
        .map(|a| a.replace('+', " "))
        .collect();
    let status = Command::new(root.join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"])
        .args(&args)
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success(), "pytest {selection} failed");
}
