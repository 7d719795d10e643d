//! Compiles the client stubs of splitlearn.comm (the server crate compiles
//! its own; this crate must not link libtorch, so it shares no code with it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/splitlearn");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_with_config(
            config,
            &["../proto/splitlearn/comm/compute_service.proto"],
            &["../proto"],
        )?;
    Ok(())
}
