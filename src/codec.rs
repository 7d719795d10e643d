//! Wire bytes <-> raw tensors: dtype, shape and size checks, float16 and zlib
//! detection. Pure Rust: nothing here calls libtorch, so it runs on io threads.
//!
//! splitlearn_comm sends raw little-endian row-major bytes plus a shape, without
//! a dtype. What its codecs produce, and so what is recognised without any hint:
//! float32 (`len = n * 4`), float16 (`len = n * 2`), and either of them
//! zlib-compressed (`CompressedTensorCodec`). The answer goes back in the same
//! encoding. Other dtypes need the opt-in request metadata key [`DTYPE_KEY`];
//! the reply then carries its dtype in the response header of the same name.

use std::io::Read;

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use prost::bytes::Bytes;

/// Request metadata key (and response header) naming a tensor's dtype explicitly.
pub const DTYPE_KEY: &str = "splitserve-dtype";

/// Element types a payload may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl WireDtype {
    pub fn size(self) -> usize {
        match self {
            WireDtype::F64 | WireDtype::I64 => 8,
            WireDtype::F32 | WireDtype::I32 => 4,
            WireDtype::F16 | WireDtype::BF16 | WireDtype::I16 => 2,
            WireDtype::I8 | WireDtype::U8 | WireDtype::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "float32",
            WireDtype::F16 => "float16",
            WireDtype::BF16 => "bfloat16",
            WireDtype::F64 => "float64",
            WireDtype::I64 => "int64",
            WireDtype::I32 => "int32",
            WireDtype::I16 => "int16",
            WireDtype::I8 => "int8",
            WireDtype::U8 => "uint8",
            WireDtype::Bool => "bool",
        }
    }

    pub fn parse(s: &str) -> Option<WireDtype> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "float" | "f32" => WireDtype::F32,
            "float16" | "half" | "f16" => WireDtype::F16,
            "bfloat16" | "bf16" => WireDtype::BF16,
            "float64" | "double" | "f64" => WireDtype::F64,
            "int64" | "long" | "i64" => WireDtype::I64,
            "int32" | "int" | "i32" => WireDtype::I32,
            "int16" | "short" | "i16" => WireDtype::I16,
            "int8" | "i8" => WireDtype::I8,
            "uint8" | "u8" => WireDtype::U8,
            "bool" => WireDtype::Bool,
            _ => return None,
        })
    }

    pub fn to_kind(self) -> tch::Kind {
        match self {
            WireDtype::F32 => tch::Kind::Float,
            WireDtype::F16 => tch::Kind::Half,
            WireDtype::BF16 => tch::Kind::BFloat16,
            WireDtype::F64 => tch::Kind::Double,
            WireDtype::I64 => tch::Kind::Int64,
            WireDtype::I32 => tch::Kind::Int,
            WireDtype::I16 => tch::Kind::Int16,
            WireDtype::I8 => tch::Kind::Int8,
            WireDtype::U8 => tch::Kind::Uint8,
            WireDtype::Bool => tch::Kind::Bool,
        }
    }

    pub fn from_kind(kind: tch::Kind) -> Option<WireDtype> {
        Some(match kind {
            tch::Kind::Float => WireDtype::F32,
            tch::Kind::Half => WireDtype::F16,
            tch::Kind::BFloat16 => WireDtype::BF16,
            tch::Kind::Double => WireDtype::F64,
            tch::Kind::Int64 => WireDtype::I64,
            tch::Kind::Int => WireDtype::I32,
            tch::Kind::Int16 => WireDtype::I16,
            tch::Kind::Int8 => WireDtype::I8,
            tch::Kind::Uint8 => WireDtype::U8,
            tch::Kind::Bool => WireDtype::Bool,
            _ => return None,
        })
    }
}

/// How a payload was encoded on the wire; the reply uses the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub dtype: WireDtype,
    pub compressed: bool,
    /// The client named the dtype with [`DTYPE_KEY`]: the reply keeps the
    /// model's output dtype and names it in the response header.
    pub explicit: bool,
}

/// A tensor as plain bytes: what travels between io threads and workers.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub data: Bytes,
    pub shape: Vec<i64>,
    pub dtype: WireDtype,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// float32 from host values (clients, tests, benchmarks).
    pub fn from_f32(values: &[f32], shape: &[i64]) -> RawTensor {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        RawTensor {
            data: data.into(),
            shape: shape.to_vec(),
            dtype: WireDtype::F32,
        }
    }
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Limits {
    /// Largest tensor a request may carry, in elements.
    pub max_elements: u64,
    /// Most bytes a zlib payload may inflate to.
    pub max_decompressed_bytes: usize,
}

/// Most dimensions a shape may have (libtorch allows 64; nothing real needs more than a few).
pub const MAX_DIMS: usize = 32;

/// Longest piece of client text repeated in a message or a log line.
pub const MAX_ECHO: usize = 128;

/// Client text as it may appear in messages: at most [`MAX_ECHO`] characters.
pub fn clip(s: &str) -> String {
    cut(s, MAX_ECHO)
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

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("shape has {dims} dimensions; this server accepts at most {MAX_DIMS}")]
    TooManyDims { dims: usize },
    #[error(
        "a zlib payload may inflate to at most {limit} bytes (--max-decompressed-bytes); this one inflates to more"
    )]
    DecompressedTooLarge { limit: usize },
    #[error("shape dimension {index} is {value}; dimensions must be >= 0")]
    NegativeDimension { index: usize, value: i32 },
    #[error(
        "shape {shape:?} has {elements} elements, more than the server's limit of {limit} (--max-elements)"
    )]
    TooManyElements {
        shape: Vec<i32>,
        elements: u128,
        limit: u64,
    },
    #[error(
        "data is {len} bytes, which fits no encoding of shape {shape:?} ({elements} elements): \
         expected {f32_len} bytes of float32, {f16_len} bytes of float16, or a zlib stream \
         inflating to one of those"
    )]
    LengthMismatch {
        len: usize,
        shape: Vec<i64>,
        elements: usize,
        f32_len: usize,
        f16_len: usize,
    },
    #[error(
        "data is {len} bytes, but shape {shape:?} of {dtype} needs {expected} bytes \
         (or a zlib stream inflating to that)"
    )]
    ExplicitLengthMismatch {
        len: usize,
        shape: Vec<i64>,
        dtype: &'static str,
        expected: usize,
    },
    #[error(
        "unknown dtype {0:?} in request metadata '{DTYPE_KEY}' (known: float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool)"
    )]
    UnknownDtype(String),
}

/// Checks a wire shape and returns it as i64 dims and its element count. The
/// dimensions other than 0 must also fit the limit together: libtorch sizes
/// storage from them, and overflows there even when one dimension is 0.
pub fn check_shape(shape: &[i32], limits: Limits) -> Result<(Vec<i64>, usize), CodecError> {
    if shape.len() > MAX_DIMS {
        return Err(CodecError::TooManyDims { dims: shape.len() });
    }
    let mut elements: u128 = 1;
    let mut nonzero: u128 = 1;
    for (index, &value) in shape.iter().enumerate() {
        if value < 0 {
            return Err(CodecError::NegativeDimension { index, value });
        }
        elements = elements.saturating_mul(value as u128);
        if value > 0 {
            nonzero = nonzero.saturating_mul(value as u128);
        }
    }
    if nonzero > limits.max_elements as u128 {
        return Err(CodecError::TooManyElements {
            shape: shape.to_vec(),
            elements: nonzero,
            limit: limits.max_elements,
        });
    }
    if elements > limits.max_elements as u128 {
        return Err(CodecError::TooManyElements {
            shape: shape.to_vec(),
            elements,
            limit: limits.max_elements,
        });
    }
    Ok((shape.iter().map(|&d| d as i64).collect(), elements as usize))
}

/// A zlib stream starts with a CMF/FLG pair: deflate, window <= 32K, checksum.
fn looks_like_zlib(data: &[u8]) -> bool {
    data.len() >= 2
        && data[0] & 0x0f == 8
        && data[0] >> 4 <= 7
        && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0
}

/// Inflates at most `max` bytes; None if the stream is invalid or longer.
fn inflate_bounded(data: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(max.min(1 << 20));
    let mut decoder = ZlibDecoder::new(data).take(max as u64 + 1);
    decoder.read_to_end(&mut out).ok()?;
    (out.len() <= max).then_some(out)
}

/// True when decoding this payload may inflate it: expensive, so the caller
/// runs [`decode`] off the I/O threads (on a [`CodecPool`]).
pub fn may_inflate(data: &[u8], shape: &[i32], dtype_hint: Option<&str>) -> bool {
    if !looks_like_zlib(data) {
        return false;
    }
    let n: u128 = shape
        .iter()
        .map(|&d| d.max(0) as u128)
        .fold(1, u128::saturating_mul);
    match dtype_hint.and_then(WireDtype::parse) {
        Some(dtype) => data.len() as u128 != n.saturating_mul(dtype.size() as u128),
        None => n > 0,
    }
}

/// Inflates for [`decode`]: the exact size wanted, within the decompression limit.
fn inflate_within(data: &[u8], want: usize, limits: Limits) -> Result<Option<Vec<u8>>, CodecError> {
    let max = want.min(limits.max_decompressed_bytes);
    match inflate_bounded(data, max) {
        Some(raw) => Ok(Some(raw)),
        // A valid stream that goes past the limit (but would fit the shape) is
        // refused as too large; an invalid one is just not zlib.
        None if want > max && stream_is_longer(data, max) => {
            Err(CodecError::DecompressedTooLarge {
                limit: limits.max_decompressed_bytes,
            })
        }
        None => Ok(None),
    }
}

/// Whether `data` is a zlib stream that inflates past `max` bytes without error.
fn stream_is_longer(data: &[u8], max: usize) -> bool {
    let mut decoder = ZlibDecoder::new(data).take(max as u64 + 1);
    let mut sink = [0u8; 8192];
    let mut total = 0usize;
    loop {
        match decoder.read(&mut sink) {
            Ok(0) => return false,
            Ok(n) => {
                total += n;
                if total > max {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Decodes a request tensor. `dtype_hint` is the opt-in metadata value, if any.
pub fn decode(
    data: Bytes,
    shape: &[i32],
    dtype_hint: Option<&str>,
    limits: Limits,
) -> Result<(RawTensor, Encoding), CodecError> {
    let (shape, n) = check_shape(shape, limits)?;
    let len = data.len();
    if let Some(hint) = dtype_hint {
        let dtype = WireDtype::parse(hint).ok_or_else(|| CodecError::UnknownDtype(clip(hint)))?;
        let expected = n * dtype.size();
        let (data, compressed) = if len == expected {
            (data, false)
        } else {
            let inflated = if looks_like_zlib(&data) {
                inflate_within(&data, expected, limits)?
            } else {
                None
            };
            match inflated {
                Some(raw) if raw.len() == expected => (Bytes::from(raw), true),
                _ => {
                    return Err(CodecError::ExplicitLengthMismatch {
                        len,
                        shape,
                        dtype: dtype.name(),
                        expected,
                    });
                }
            }
        };
        let enc = Encoding {
            dtype,
            compressed,
            explicit: true,
        };
        return Ok((RawTensor { data, shape, dtype }, enc));
    }

    // A complete zlib stream with a valid checksum that inflates to exactly one
    // of the two sizes is compressed; random float bytes never pass that test.
    if looks_like_zlib(&data) && n > 0 {
        if let Some(raw) = inflate_within(&data, n * 4, limits)? {
            let dtype = if raw.len() == n * 4 {
                Some(WireDtype::F32)
            } else if raw.len() == n * 2 {
                Some(WireDtype::F16)
            } else {
                None
            };
            if let Some(dtype) = dtype {
                let enc = Encoding {
                    dtype,
                    compressed: true,
                    explicit: false,
                };
                return Ok((
                    RawTensor {
                        data: raw.into(),
                        shape,
                        dtype,
                    },
                    enc,
                ));
            }
        }
    }
    let dtype = if len == n * 4 {
        WireDtype::F32
    } else if len == n * 2 {
        WireDtype::F16
    } else {
        return Err(CodecError::LengthMismatch {
            len,
            shape,
            elements: n,
            f32_len: n * 4,
            f16_len: n * 2,
        });
    };
    let enc = Encoding {
        dtype,
        compressed: false,
        explicit: false,
    };
    Ok((RawTensor { data, shape, dtype }, enc))
}

/// The payload bytes of a reply tensor in the request's encoding. The worker has
/// already converted the tensor to the right dtype; this only compresses.
pub fn encode(tensor: &RawTensor, enc: Encoding) -> Bytes {
    if !enc.compressed {
        return tensor.data.clone();
    }
    let mut e = ZlibEncoder::new(
        Vec::with_capacity(tensor.data.len() / 2 + 64),
        Compression::fast(),
    );
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = e.write_all(&tensor.data);
    e.finish().unwrap_or_default().into()
}

/// Encodes tensors as [`encode`] does, or None once their bytes together
/// would pass `room`: compressed ones are written into buffers that stop
/// there, so a reply over the limit is never built whole.
pub fn encode_within(tensors: &[(RawTensor, Encoding)], mut room: usize) -> Option<Vec<Bytes>> {
    use std::io::Write;
    tensors
        .iter()
        .map(|(t, enc)| {
            let bytes = if enc.compressed {
                let mut e = ZlibEncoder::new(
                    Capped::new(room, t.data.len().min(room) / 2 + 64),
                    Compression::fast(),
                );
                e.write_all(&t.data).ok()?;
                Bytes::from(e.finish().ok()?.buf)
            } else if t.data.len() <= room {
                t.data.clone()
            } else {
                return None;
            };
            room -= bytes.len();
            Some(bytes)
        })
        .collect()
}

/// A buffer that refuses to grow past its room: writing more is an error.
pub struct Capped {
    pub buf: Vec<u8>,
    room: usize,
}

impl Capped {
    /// Room for `room` bytes, `capacity` of them allocated up front.
    pub fn new(room: usize, capacity: usize) -> Capped {
        Capped {
            buf: Vec::with_capacity(capacity.min(room)),
            room,
        }
    }
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.room - self.buf.len() {
            return Err(std::io::Error::other("over the size limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A thread that inflates and deflates payloads, so that zlib never runs on
/// the I/O threads that also answer health probes. Its queue is bounded: when
/// it is full, callers are refused at once instead of waiting.
pub struct CodecPool {
    jobs: std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
}

/// The codec thread's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server's decompression queue is full; retry with backoff")]
pub struct CodecBusy;

impl CodecPool {
    /// Starts the thread (`splitserve-codec`) with room for `queue` waiting jobs.
    /// It exits when the pool is dropped.
    pub fn start(queue: usize) -> std::io::Result<CodecPool> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(queue);
        std::thread::Builder::new()
            .name("splitserve-codec".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(CodecPool { jobs })
    }

    /// Runs `f` on the codec thread and waits for it without blocking the caller's thread.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CodecBusy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| CodecBusy)?;
        rx.await.map_err(|_| CodecBusy)
    }
}

/// Inflates a zlib payload (clients use this to read compressed replies).
pub fn inflate(data: &[u8], max: usize) -> Option<Vec<u8>> {
    inflate_bounded(data, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_elements: 1 << 20,
        max_decompressed_bytes: 1 << 22,
    };

    fn zlib(bytes: &[u8]) -> Bytes {
        use std::io::Write;
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap().into()
    }

    #[test]
    fn float32_and_float16_are_told_apart_by_length() {
        let (t, e) = decode(Bytes::from(vec![0u8; 24]), &[2, 3], None, L).unwrap();
        assert_eq!((t.dtype, e.compressed), (WireDtype::F32, false));
        let (t, _) = decode(Bytes::from(vec![0u8; 12]), &[2, 3], None, L).unwrap();
        assert_eq!(t.dtype, WireDtype::F16);
    }

    #[test]
    fn zlib_payloads_are_inflated_and_replied_compressed() {
        let raw = RawTensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let (t, e) = decode(zlib(&raw.data), &[2, 3], None, L).unwrap();
        assert_eq!(t, raw);
        assert!(e.compressed);
        let wire = encode(&t, e);
        assert_eq!(inflate(&wire, 24).unwrap(), raw.data.to_vec());
        let half = vec![0x3cu8; 12];
        let (t, e) = decode(zlib(&half), &[2, 3], None, L).unwrap();
        assert_eq!((t.dtype, e.compressed), (WireDtype::F16, true));
    }

    #[test]
    fn a_float_payload_that_starts_like_zlib_stays_float() {
        // 0x78 0x9c is the most common zlib header; as floats it is just data.
        let mut data = vec![0x78u8, 0x9c];
        data.extend_from_slice(&[7u8; 22]);
        let (t, e) = decode(Bytes::from(data), &[6], None, L).unwrap();
        assert_eq!((t.dtype, e.compressed), (WireDtype::F32, false));
    }

    #[test]
    fn bad_lengths_and_shapes_are_named() {
        let err = decode(Bytes::from(vec![0u8; 10]), &[2, 3], None, L).unwrap_err();
        assert!(err.to_string().contains("10 bytes"), "{err}");
        assert!(matches!(
            decode(Bytes::new(), &[2, -3], None, L),
            Err(CodecError::NegativeDimension {
                index: 1,
                value: -3
            })
        ));
        let err = decode(Bytes::new(), &[i32::MAX, i32::MAX, i32::MAX], None, L).unwrap_err();
        assert!(matches!(err, CodecError::TooManyElements { .. }));
    }

    #[test]
    fn explicit_dtypes_need_the_exact_size() {
        let (t, e) = decode(Bytes::from(vec![0u8; 16]), &[2], Some("int64"), L).unwrap();
        assert_eq!((t.dtype, e.explicit), (WireDtype::I64, true));
        assert!(decode(Bytes::from(vec![0u8; 8]), &[2], Some("int64"), L).is_err());
        assert!(matches!(
            decode(Bytes::new(), &[0], Some("complex"), L),
            Err(CodecError::UnknownDtype(_))
        ));
    }

    #[test]
    fn hostile_shapes_and_bombs_are_refused_with_short_messages() {
        let dims = vec![1; 5000];
        let err = decode(Bytes::new(), &dims, None, L).unwrap_err();
        assert_eq!(err, CodecError::TooManyDims { dims: 5000 });
        assert!(err.to_string().len() < 100, "{err}");
        // One dimension 0, the others overflowing libtorch's storage size.
        let err = decode(Bytes::new(), &[0, i32::MAX, i32::MAX, i32::MAX], None, L).unwrap_err();
        assert!(matches!(err, CodecError::TooManyElements { .. }), "{err}");
        // 1 MiB of zeros deflates to ~1 KB; the limit here is 64 KiB.
        let small = Limits {
            max_elements: 1 << 20,
            max_decompressed_bytes: 1 << 16,
        };
        let bomb = zlib(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 4096);
        assert!(may_inflate(&bomb, &[1 << 18], None));
        assert_eq!(
            decode(bomb, &[1 << 18], None, small).unwrap_err(),
            CodecError::DecompressedTooLarge { limit: 1 << 16 }
        );
        assert!(!may_inflate(&[0u8; 16], &[4], None));
        let long = "x".repeat(10_000);
        let err = decode(Bytes::new(), &[0], Some(&long), L).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
        assert_eq!(clip(&long).len(), MAX_ECHO);
    }

    #[test]
    fn scalars_and_empty_tensors() {
        let (t, _) = decode(Bytes::from(vec![0u8; 4]), &[], None, L).unwrap();
        assert_eq!((t.numel(), t.dtype), (1, WireDtype::F32));
        let (t, _) = decode(Bytes::new(), &[0, 5], None, L).unwrap();
        assert_eq!(t.numel(), 0);
    }
}
