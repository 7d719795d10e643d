//! Generated protobuf code, shared by the front-ends (`grpc`, `http`) and the
//! model repository (`repository`, which parses Triton's ModelConfig).

/// Descriptor set of every proto the server speaks (splitlearn.comm and
/// inference), for reflection and for parsing config.pbtxt by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("splitserve_descriptor");

/// `splitlearn.comm` (kept in OUT_DIR).
#[allow(clippy::all, clippy::unwrap_used)]
pub mod comm {
    tonic::include_proto!("splitlearn.comm");
    pub use super::FILE_DESCRIPTOR_SET;
}

/// The Open Inference Protocol and Triton's model configuration, package `inference`.
#[allow(clippy::all, clippy::unwrap_used)]
pub mod inference {
    tonic::include_proto!("inference");
}
