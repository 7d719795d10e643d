//! Compiles the protos and makes the binary find libtorch on its own.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build 0.14 does not print this itself (grpc/grpc-rust#2511).
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("splitserve_descriptor.bin"))
        // Tensor payloads stay zero-copy slices of the HTTP/2 frames.
        .bytes(".")
        .compile_with_config(
            prost_config,
            &[
                "proto/splitlearn/comm/compute_service.proto",
                "proto/inference/grpc_service.proto",
                "proto/inference/model_config.proto",
            ],
            &["proto"],
        )?;

    // torch-sys publishes the libtorch directory it linked against (links = "tch").
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let torch_version = match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => {
            // Run without LD_LIBRARY_PATH: the loader finds libtorch through the rpath.
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
            // The linker's --as-needed would drop libtorch_cuda (nothing references it
            // by symbol); keep it so the same binary sees CUDA devices where they exist.
            // SPLITSERVE_LINK_CUDA=0 leaves it out: a CPU-only binary that loads
            // neither libtorch_cuda nor the CUDA libraries behind it (the CPU image).
            println!("cargo:rerun-if-env-changed=SPLITSERVE_LINK_CUDA");
            let link_cuda = env::var("SPLITSERVE_LINK_CUDA").map_or(true, |v| v != "0");
            if link_cuda && Path::new(&lib).join("libtorch_cuda.so").exists() {
                println!(
                    "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state"
                );
            }
            // An AOTInductor package's library needs libtorch.so (by name, without a
            // path): kept loaded, the loader finds it when a package is opened.
            println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch,--pop-state");
            compile_aoti_shim(Path::new(&lib));
            compile_cuda_memory_shim(Path::new(&lib));
            torch_version_near(Path::new(&lib)).unwrap_or_else(|| "unknown".into())
        }
        Err(_) => "unknown".into(),
    };
    println!("cargo:rustc-env=SPLITSERVE_TORCH_VERSION={torch_version}");
    // The wheel's version names its CUDA build: 2.13.0+cu130, 2.13.0+cpu.
    let cuda = match torch_version.split_once('+') {
        Some((_, b)) if b.starts_with("cu") => b.to_string(),
        Some((_, b)) => format!("none ({b} build)"),
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=SPLITSERVE_CUDA={cuda}");
    // The commit built, for --version; "unknown" outside a git checkout.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SPLITSERVE_GIT_COMMIT={commit}");
    Ok(())
}

/// Compiles the C++ shim over AOTInductor's package loader (src/aoti.rs) against
/// the libtorch torch-sys linked: its headers sit beside `lib/`, and the C++ ABI
/// flag is decided as torch-sys decides it (the wheel's own
/// `torch._C._GLIBCXX_USE_CXX11_ABI` with LIBTORCH_USE_PYTORCH, else
/// LIBTORCH_CXX11_ABI, default 1), so that std::string and std::vector mean
/// the same on both sides.
fn compile_aoti_shim(lib: &Path) {
    println!("cargo:rerun-if-changed=csrc/aoti_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib.parent().unwrap_or(lib);
    let abi = cxx11_abi();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/aoti_shim.cpp")
        .compile("splitserve_aoti");
}

/// The C++ ABI flag, decided as torch-sys decides it.
fn cxx11_abi() -> String {
    if env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if env::var_os("VIRTUAL_ENV").is_some() {
            "python"
        } else {
            "python3"
        };
        let out = std::process::Command::new(python)
            .args([
                "-c",
                "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok());
        out.map(|s| s.trim().to_string())
            .unwrap_or_else(|| "1".into())
    } else {
        env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
    }
}

/// Compiles csrc/cuda_memory.cpp (the CUDA caching allocator's figures, read
/// through c10's device-allocator interface: libtorch's own headers, no CUDA
/// ones). Every build has it; without libtorch_cuda it finds no allocator.
fn compile_cuda_memory_shim(lib: &Path) {
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    let root = lib.parent().unwrap_or(lib);
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/cuda_memory.cpp")
        .compile("splitserve_cuda_memory");
}

/// The PyTorch wheel keeps `version.py` one level above `lib/`; a plain libtorch
/// archive keeps `build-version` there.
fn torch_version_near(lib: &Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest.trim_start_matches([' ', '=', ':']).trim();
                let v = v.rsplit('=').next().unwrap_or(v).trim();
                return Some(v.trim_matches(['\'', '"']).to_string());
            }
        }
    }
    fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
}
