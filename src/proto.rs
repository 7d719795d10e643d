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

/// Triton's model-configuration datatype for a wire dtype (ModelConfig's `data_type`).
impl From<crate::codec::WireDtype> for inference::DataType {
    fn from(d: crate::codec::WireDtype) -> Self {
        use crate::codec::WireDtype as D;
        match d {
            D::Bool => Self::TypeBool,
            D::U8 => Self::TypeUint8,
            D::I8 => Self::TypeInt8,
            D::I16 => Self::TypeInt16,
            D::I32 => Self::TypeInt32,
            D::I64 => Self::TypeInt64,
            D::F16 => Self::TypeFp16,
            D::BF16 => Self::TypeBf16,
            D::F32 => Self::TypeFp32,
            D::F64 => Self::TypeFp64,
        }
    }
}
