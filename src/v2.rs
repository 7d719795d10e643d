//! The Open Inference Protocol's (KServe v2) view of tensors, shared by its
//! gRPC and HTTP front-ends: datatype names, Triton's PyTorch-backend tensor
//! names (`INPUT__0`, `OUTPUT__0`, ...), typed contents, and the checks of a
//! request against the model's signature. Pure Rust: runs on the I/O threads.

use prost::bytes::Bytes;

use crate::codec::{self, Limits, MAX_DIMS, RawTensor, WireDtype};
use crate::model::{Signature, TensorSig};
use crate::proto::inference::ModelConfig;

/// A client mistake in a v2 request: INVALID_ARGUMENT (HTTP 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct V2Error(pub String);

fn bad(msg: String) -> V2Error {
    V2Error(msg)
}

/// The protocol's name of a dtype.
pub fn datatype_name(d: WireDtype) -> &'static str {
    match d {
        WireDtype::Bool => "BOOL",
        WireDtype::U8 => "UINT8",
        WireDtype::I8 => "INT8",
        WireDtype::I16 => "INT16",
        WireDtype::I32 => "INT32",
        WireDtype::I64 => "INT64",
        WireDtype::F16 => "FP16",
        WireDtype::BF16 => "BF16",
        WireDtype::F32 => "FP32",
        WireDtype::F64 => "FP64",
    }
}

/// A protocol datatype libtorch can compute with.
pub fn parse_datatype(tensor: &str, s: &str) -> Result<WireDtype, V2Error> {
    Ok(match s {
        "BOOL" => WireDtype::Bool,
        "UINT8" => WireDtype::U8,
        "INT8" => WireDtype::I8,
        "INT16" => WireDtype::I16,
        "INT32" => WireDtype::I32,
        "INT64" => WireDtype::I64,
        "FP16" => WireDtype::F16,
        "BF16" => WireDtype::BF16,
        "FP32" => WireDtype::F32,
        "FP64" => WireDtype::F64,
        "BYTES" | "UINT16" | "UINT32" | "UINT64" => {
            return Err(bad(format!(
                "input {}: datatype {s} is not supported by this server (libtorch tensors: BOOL, \
                 UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64)",
                codec::clip(tensor)
            )));
        }
        other => {
            return Err(bad(format!(
                "input {}: unknown datatype {:?}",
                codec::clip(tensor),
                codec::clip(other)
            )));
        }
    })
}

/// Triton's PyTorch backend names: the Nth input of `forward` is `INPUT__N`.
pub fn input_name(i: usize) -> String {
    format!("INPUT__{i}")
}

/// The Nth output of `forward` (a tuple's Nth element) is `OUTPUT__N`.
pub fn output_name(i: usize) -> String {
    format!("OUTPUT__{i}")
}

fn index_of(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// One input tensor of a request, its bytes little-endian row-major.
#[derive(Debug, Clone)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

fn show_shape(shape: &[i64]) -> String {
    let shown: Vec<String> = shape.iter().take(MAX_DIMS).map(i64::to_string).collect();
    format!("[{}]", shown.join(","))
}

/// The elements of a shape whose dimensions are >= 0, within `--max-elements`.
pub fn element_count(tensor: &str, shape: &[i64], limits: Limits) -> Result<u64, V2Error> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
        .filter(|&n| n <= limits.max_elements)
        .ok_or_else(|| {
            bad(format!(
                "input {}: shape {} has more elements than this server's limit of {} (--max-elements)",
                codec::clip(tensor),
                show_shape(shape),
                limits.max_elements
            ))
        })
}

/// Puts a request's inputs in `forward`'s order and checks each against the
/// model's signature (when known): name, datatype, shape and data size.
pub fn order_inputs(
    model: &str,
    inputs: Vec<InputTensor>,
    signature: Option<&Signature>,
    limits: Limits,
) -> Result<Vec<RawTensor>, V2Error> {
    let expected = signature.map(|s| s.inputs.len());
    let mut slots: Vec<Option<RawTensor>> = Vec::new();
    for input in inputs {
        let Some(i) = index_of(&input.name, "INPUT__") else {
            return Err(bad(format!(
                "unknown input {:?}: model {model:?} takes {}",
                codec::clip(&input.name),
                match expected {
                    Some(n) => (0..n).map(input_name).collect::<Vec<_>>().join(", "),
                    None => "INPUT__0, INPUT__1, ... in forward's order".into(),
                }
            )));
        };
        if expected.is_some_and(|n| i >= n) || i >= 64 {
            return Err(bad(format!(
                "unknown input {}: model {model:?} takes {} input(s)",
                input_name(i),
                expected.unwrap_or(64)
            )));
        }
        let dtype = parse_datatype(&input.name, &input.datatype)?;
        if input.shape.len() > MAX_DIMS || input.shape.iter().any(|&d| d < 0) {
            return Err(bad(format!(
                "input {}: shape {} must have at most {MAX_DIMS} dimensions, each >= 0",
                input_name(i),
                show_shape(&input.shape)
            )));
        }
        let n = element_count(&input_name(i), &input.shape, limits)?;
        if let Some(TensorSig {
            dtype: want,
            shape: want_shape,
        }) = signature.and_then(|s| s.inputs.get(i))
        {
            if dtype != *want {
                return Err(bad(format!(
                    "input {} has datatype {}; model {model:?} expects {}",
                    input_name(i),
                    datatype_name(dtype),
                    datatype_name(*want)
                )));
            }
            let fits = want_shape.len() == input.shape.len()
                && want_shape
                    .iter()
                    .zip(&input.shape)
                    .all(|(&w, &g)| w < 0 || w == g);
            if !fits {
                return Err(bad(format!(
                    "input {} has shape {}; model {model:?} expects {}",
                    input_name(i),
                    show_shape(&input.shape),
                    show_shape(want_shape)
                )));
            }
        }
        let need = n as usize * dtype.size();
        if input.data.len() != need {
            return Err(bad(format!(
                "input {}: {} bytes of data, but shape {} of {} needs {need}",
                input_name(i),
                input.data.len(),
                show_shape(&input.shape),
                datatype_name(dtype)
            )));
        }
        if slots.len() <= i {
            slots.resize(i + 1, None);
        }
        if slots[i].is_some() {
            return Err(bad(format!("input {} is given twice", input_name(i))));
        }
        slots[i] = Some(RawTensor {
            data: input.data,
            shape: input.shape,
            dtype,
        });
    }
    let want = expected.unwrap_or(slots.len()).max(1);
    slots.resize(want.max(slots.len()), None);
    slots
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.ok_or_else(|| {
                bad(format!(
                    "input {} is missing: model {model:?} takes {want} input(s)",
                    input_name(i)
                ))
            })
        })
        .collect()
}

/// The outputs a request asked for (all when it named none), with their names.
pub fn select_outputs(
    outputs: Vec<RawTensor>,
    requested: &[String],
) -> Result<Vec<(String, RawTensor)>, V2Error> {
    let named: Vec<(String, RawTensor)> = outputs
        .into_iter()
        .enumerate()
        .map(|(i, t)| (output_name(i), t))
        .collect();
    if requested.is_empty() {
        return Ok(named);
    }
    let mut chosen = Vec::with_capacity(requested.len());
    for r in requested {
        match named.iter().find(|(n, _)| n == r) {
            Some((n, t)) => chosen.push((n.clone(), t.clone())),
            None => {
                return Err(bad(format!(
                    "unknown output {:?}: the model returns {}",
                    codec::clip(r),
                    named
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Ok(chosen)
}

/// Refuses a list of requested outputs that names one more than once, as
/// Triton does: each mention would be sent again, so a short request could
/// ask for a reply many times the size of the model's outputs.
pub fn check_requested_outputs(requested: &[String]) -> Result<(), V2Error> {
    let mut seen = std::collections::HashSet::with_capacity(requested.len());
    for name in requested {
        if !seen.insert(name.as_str()) {
            return Err(bad(format!(
                "output {:?} is requested more than once",
                codec::clip(name)
            )));
        }
    }
    Ok(())
}

/// Bytes one element of `dtype` takes in a reply's JSON `data` array, its
/// separator included: (fewest, most). serde_json writes integers in decimal
/// and floats in their shortest round-trip form (ryu: at most 24 characters;
/// FP16 and BF16 as FP32), a non-finite float as `null`.
pub fn json_element_bytes(dtype: WireDtype) -> (u64, u64) {
    use WireDtype as D;
    match dtype {
        D::Bool => (5, 6),
        D::U8 => (2, 4),
        D::I8 => (2, 5),
        D::I16 => (2, 7),
        D::I32 => (2, 12),
        D::I64 => (2, 21),
        // "0.0," at the least.
        D::F16 | D::BF16 | D::F32 | D::F64 => (4, 25),
    }
}

/// The fewest and most bytes of a tensor's JSON `data` array, known before
/// it is written.
pub fn json_data_bounds(t: &RawTensor) -> (u64, u64) {
    let n = (t.data.len() / t.dtype.size()) as u64;
    let (fewest, most) = json_element_bytes(t.dtype);
    // The brackets, and no separator after the last element.
    (
        2 + n.saturating_mul(fewest).saturating_sub(1),
        2u64.saturating_add(n.saturating_mul(most)),
    )
}

/// A tensor's values as a flat JSON array, written straight from its bytes:
/// no list of values or tree of JSON values in between.
pub struct JsonData<'a>(pub &'a RawTensor);

impl serde::Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use WireDtype as D;
        use serde::ser::SerializeSeq;
        let (b, dtype) = (&self.0.data[..], self.0.dtype);
        let mut seq = s.serialize_seq(Some(b.len() / dtype.size()))?;
        match dtype {
            D::Bool => b
                .iter()
                .try_for_each(|&x| seq.serialize_element(&(x != 0)))?,
            D::U8 => b.iter().try_for_each(|x| seq.serialize_element(x))?,
            D::I8 => b
                .iter()
                .try_for_each(|&x| seq.serialize_element(&(x as i8)))?,
            D::I16 => b
                .chunks_exact(2)
                .try_for_each(|c| seq.serialize_element(&i16::from_le_bytes([c[0], c[1]])))?,
            D::I32 => b.chunks_exact(4).try_for_each(|c| {
                seq.serialize_element(&i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            })?,
            D::I64 => b.chunks_exact(8).try_for_each(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                seq.serialize_element(&i64::from_le_bytes(a))
            })?,
            D::F16 => b.chunks_exact(2).try_for_each(|c| {
                seq.serialize_element(&half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            })?,
            D::BF16 => b.chunks_exact(2).try_for_each(|c| {
                seq.serialize_element(&half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            })?,
            D::F32 => b.chunks_exact(4).try_for_each(|c| {
                seq.serialize_element(&f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            })?,
            D::F64 => b.chunks_exact(8).try_for_each(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                seq.serialize_element(&f64::from_le_bytes(a))
            })?,
        }
        seq.end()
    }
}

/// Values of one tensor as the typed lists the protocol carries them in.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Bool(Vec<bool>),
    /// INT8, INT16, INT32 (and UINT8 through `Uint`).
    Int(Vec<i32>),
    Int64(Vec<i64>),
    Uint(Vec<u32>),
    /// FP32; also FP16 and BF16 in JSON, as numbers.
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

/// Why a value cannot go into a tensor of a datatype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueError {
    /// A boolean for a number, a fraction for an integer, a list type that
    /// does not carry the datatype.
    Kind,
    /// A number outside what the datatype holds (INT8 1000; FP16 1e300, which
    /// would become infinity).
    Range,
}

/// Writes one tensor's values as the little-endian bytes of its datatype,
/// refusing values the datatype cannot hold instead of wrapping or rounding
/// them to infinity. The room is fixed when it is made.
#[derive(Debug)]
pub struct TensorWriter {
    dtype: WireDtype,
    out: Vec<u8>,
}

impl TensorWriter {
    /// Room for `elements` values (a bound the caller has checked).
    pub fn with_capacity(dtype: WireDtype, elements: usize) -> TensorWriter {
        TensorWriter {
            dtype,
            out: Vec::with_capacity(elements.saturating_mul(dtype.size())),
        }
    }

    pub fn bool(&mut self, b: bool) -> Result<(), ValueError> {
        match self.dtype {
            WireDtype::Bool => {
                self.out.push(u8::from(b));
                Ok(())
            }
            _ => Err(ValueError::Kind),
        }
    }

    /// An integer (from JSON or an integer contents list).
    pub fn int(&mut self, x: i128) -> Result<(), ValueError> {
        use WireDtype as D;
        fn fit<T: TryFrom<i128>>(x: i128) -> Result<T, ValueError> {
            T::try_from(x).map_err(|_| ValueError::Range)
        }
        match self.dtype {
            D::Bool => return Err(ValueError::Kind),
            D::U8 => self.out.push(fit::<u8>(x)?),
            D::I8 => self.out.extend_from_slice(&fit::<i8>(x)?.to_le_bytes()),
            D::I16 => self.out.extend_from_slice(&fit::<i16>(x)?.to_le_bytes()),
            D::I32 => self.out.extend_from_slice(&fit::<i32>(x)?.to_le_bytes()),
            D::I64 => self.out.extend_from_slice(&fit::<i64>(x)?.to_le_bytes()),
            D::F16 | D::BF16 | D::F32 | D::F64 => return self.float(x as f64),
        }
        Ok(())
    }

    /// A floating-point number: only for float datatypes, and a finite one
    /// must stay finite in the datatype (non-finite ones, which only gRPC's
    /// typed contents can carry, are kept as they are).
    pub fn float(&mut self, x: f64) -> Result<(), ValueError> {
        use WireDtype as D;
        let overflows = |finite_after: bool| x.is_finite() && !finite_after;
        match self.dtype {
            D::F64 => self.out.extend_from_slice(&x.to_le_bytes()),
            D::F32 => {
                let y = x as f32;
                if overflows(y.is_finite()) {
                    return Err(ValueError::Range);
                }
                self.out.extend_from_slice(&y.to_le_bytes());
            }
            D::F16 => {
                let y = half::f16::from_f64(x);
                if overflows(y.is_finite()) {
                    return Err(ValueError::Range);
                }
                self.out.extend_from_slice(&y.to_le_bytes());
            }
            D::BF16 => {
                let y = half::bf16::from_f64(x);
                if overflows(y.is_finite()) {
                    return Err(ValueError::Range);
                }
                self.out.extend_from_slice(&y.to_le_bytes());
            }
            D::Bool | D::U8 | D::I8 | D::I16 | D::I32 | D::I64 => return Err(ValueError::Kind),
        }
        Ok(())
    }

    /// The values written so far.
    pub fn len(&self) -> usize {
        self.out.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }
}

/// Little-endian bytes of `values` as `dtype`: the list's type must carry the
/// dtype (Triton's pairing: `int_contents` for INT8/16/32, `fp32_contents`
/// for FP32, FP16 and BF16, ...), and every value must fit it.
pub fn values_to_bytes(values: &Values, dtype: WireDtype) -> Result<Vec<u8>, ValueError> {
    use WireDtype as D;
    let carries = matches!(
        (values, dtype),
        (Values::Bool(_), D::Bool)
            | (Values::Int(_), D::I8 | D::I16 | D::I32)
            | (Values::Int64(_), D::I64)
            | (Values::Uint(_), D::U8)
            | (Values::Fp32(_), D::F32 | D::F16 | D::BF16)
            | (Values::Fp64(_), D::F64)
    );
    if !carries {
        return Err(ValueError::Kind);
    }
    let n = match values {
        Values::Bool(v) => v.len(),
        Values::Int(v) => v.len(),
        Values::Int64(v) => v.len(),
        Values::Uint(v) => v.len(),
        Values::Fp32(v) => v.len(),
        Values::Fp64(v) => v.len(),
    };
    let mut w = TensorWriter::with_capacity(dtype, n);
    match values {
        Values::Bool(v) => v.iter().try_for_each(|&b| w.bool(b))?,
        Values::Int(v) => v.iter().try_for_each(|&x| w.int(i128::from(x)))?,
        Values::Int64(v) => v.iter().try_for_each(|&x| w.int(i128::from(x)))?,
        Values::Uint(v) => v.iter().try_for_each(|&x| w.int(i128::from(x)))?,
        Values::Fp32(v) => v.iter().try_for_each(|&x| w.float(f64::from(x)))?,
        Values::Fp64(v) => v.iter().try_for_each(|&x| w.float(x))?,
    }
    Ok(w.into_bytes())
}

/// The values of little-endian `bytes` of `dtype`, in the list type the
/// protocol uses for it (FP16 and BF16 as FP32 numbers, for JSON).
pub fn bytes_to_values(bytes: &[u8], dtype: WireDtype) -> Values {
    use WireDtype as D;
    match dtype {
        D::Bool => Values::Bool(bytes.iter().map(|&b| b != 0).collect()),
        D::U8 => Values::Uint(bytes.iter().map(|&b| u32::from(b)).collect()),
        D::I8 => Values::Int(bytes.iter().map(|&b| i32::from(b as i8)).collect()),
        D::I16 => Values::Int(
            bytes
                .chunks_exact(2)
                .map(|c| i32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        D::I32 => Values::Int(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        D::I64 => Values::Int64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        D::F16 => Values::Fp32(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        D::BF16 => Values::Fp32(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        D::F32 => Values::Fp32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        D::F64 => Values::Fp64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
    }
}

/// Checks a request against a repository model's config.pbtxt (names,
/// datatypes, dims, max_batch_size) and renames its inputs and requested
/// outputs to the positions `forward` takes and returns (INPUT__N, OUTPUT__N).
pub fn check_against_config(
    cfg: &ModelConfig,
    inputs: &mut [InputTensor],
    outputs: &mut [String],
) -> Result<(), V2Error> {
    // Only for error messages: listed when a request does not fit.
    let input_names = || listed(cfg.input.iter().map(|i| i.name.as_str()));
    let mut seen = vec![false; cfg.input.len()];
    for input in inputs.iter_mut() {
        let Some(pos) = cfg.input.iter().position(|i| i.name == input.name) else {
            return Err(bad(format!(
                "unknown input {:?}: model {:?} takes {}",
                codec::clip(&input.name),
                cfg.name,
                input_names()
            )));
        };
        if std::mem::replace(&mut seen[pos], true) {
            return Err(bad(format!(
                "input {:?} is given twice",
                cfg.input[pos].name
            )));
        }
        let spec = &cfg.input[pos];
        let want = crate::repository::config::datatype_name(spec.data_type);
        if input.datatype != want {
            return Err(bad(format!(
                "input {}: datatype {} but the model's config says {want}",
                spec.name,
                codec::clip(&input.datatype)
            )));
        }
        let dims: &[i64] = if cfg.max_batch_size > 0 {
            match input.shape.split_first() {
                Some((&rows, rest)) if rows >= 1 && rows <= i64::from(cfg.max_batch_size) => rest,
                Some((&rows, _)) => {
                    return Err(bad(format!(
                        "input {}: batch of {rows} rows; the model takes 1 to {} (max_batch_size)",
                        spec.name, cfg.max_batch_size
                    )));
                }
                None => {
                    return Err(bad(format!(
                        "input {}: shape [] has no batch dimension",
                        spec.name
                    )));
                }
            }
        } else {
            &input.shape
        };
        let fits = dims.len() == spec.dims.len()
            && dims
                .iter()
                .zip(&spec.dims)
                .all(|(&d, &s)| s == -1 || d == s);
        if !fits {
            return Err(bad(format!(
                "input {}: shape {} does not match the config's dims {}{}",
                spec.name,
                show_shape(&input.shape),
                show_shape(&spec.dims),
                if cfg.max_batch_size > 0 {
                    " after the batch dimension"
                } else {
                    ""
                }
            )));
        }
        input.name = input_name(pos);
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(bad(format!(
            "input {} is missing: model {:?} takes {}",
            cfg.input[missing].name,
            cfg.name,
            input_names()
        )));
    }
    for out in outputs.iter_mut() {
        match cfg.output.iter().position(|o| &o.name == out) {
            Some(pos) => *out = output_name(pos),
            None => {
                return Err(bad(format!(
                    "unknown output {:?}: model {:?} returns {}",
                    codec::clip(out),
                    cfg.name,
                    cfg.output
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Ok(())
}

fn listed<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// Names a repository model's outputs as its config does (OUTPUT__N -> the Nth output).
pub fn name_outputs(cfg: &ModelConfig, outputs: &mut [(String, RawTensor)]) {
    for (name, _) in outputs.iter_mut() {
        if let Some(o) = index_of(name, "OUTPUT__").and_then(|i| cfg.output.get(i)) {
            name.clone_from(&o.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_elements: 1 << 20,
        max_decompressed_bytes: 1 << 20,
    };

    fn input(name: &str, datatype: &str, shape: &[i64], bytes: usize) -> InputTensor {
        InputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            data: Bytes::from(vec![0u8; bytes]),
        }
    }

    fn sig() -> Signature {
        Signature {
            inputs: vec![
                TensorSig {
                    dtype: WireDtype::F32,
                    shape: vec![-1, 4],
                },
                TensorSig {
                    dtype: WireDtype::I64,
                    shape: vec![-1],
                },
            ],
            outputs: vec![],
        }
    }

    #[test]
    fn inputs_are_ordered_by_name_and_checked_against_the_signature() {
        let got = order_inputs(
            "m",
            vec![
                input("INPUT__1", "INT64", &[2], 16),
                input("INPUT__0", "FP32", &[2, 4], 32),
            ],
            Some(&sig()),
            L,
        )
        .unwrap();
        assert_eq!(got[0].dtype, WireDtype::F32);
        assert_eq!(got[1].dtype, WireDtype::I64);
        let e = order_inputs(
            "m",
            vec![input("INPUT__0", "FP32", &[2, 4], 32)],
            Some(&sig()),
            L,
        )
        .unwrap_err();
        assert!(e.0.contains("INPUT__1 is missing"), "{e}");
        let e = order_inputs(
            "m",
            vec![
                input("INPUT__0", "FP64", &[2, 4], 64),
                input("INPUT__1", "INT64", &[2], 16),
            ],
            Some(&sig()),
            L,
        )
        .unwrap_err();
        assert!(
            e.0.contains("INPUT__0 has datatype FP64") && e.0.contains("FP32"),
            "{e}"
        );
        let e = order_inputs(
            "m",
            vec![
                input("INPUT__0", "FP32", &[2, 5], 40),
                input("INPUT__1", "INT64", &[2], 16),
            ],
            Some(&sig()),
            L,
        )
        .unwrap_err();
        assert!(e.0.contains("[2,5]") && e.0.contains("[-1,4]"), "{e}");
        let e = order_inputs("m", vec![input("x", "FP32", &[1], 4)], None, L).unwrap_err();
        assert!(e.0.contains("unknown input"), "{e}");
        let e = order_inputs("m", vec![input("INPUT__0", "BYTES", &[1], 4)], None, L).unwrap_err();
        assert!(e.0.contains("not supported"), "{e}");
        let e = order_inputs("m", vec![input("INPUT__0", "FP32", &[3], 4)], None, L).unwrap_err();
        assert!(e.0.contains("needs 12"), "{e}");
    }

    #[test]
    fn values_round_trip_through_bytes() {
        for (values, dtype) in [
            (Values::Bool(vec![true, false]), WireDtype::Bool),
            (Values::Int(vec![-3, 7]), WireDtype::I8),
            (Values::Int(vec![-300, 7]), WireDtype::I16),
            (Values::Int64(vec![-3, 1 << 40]), WireDtype::I64),
            (Values::Uint(vec![0, 255]), WireDtype::U8),
            (Values::Fp32(vec![0.5, -2.0]), WireDtype::F16),
            (Values::Fp32(vec![0.5, -2.0]), WireDtype::BF16),
            (Values::Fp64(vec![0.1, -2.0]), WireDtype::F64),
        ] {
            let bytes = values_to_bytes(&values, dtype).unwrap();
            assert_eq!(bytes.len(), 2 * dtype.size());
            assert_eq!(bytes_to_values(&bytes, dtype), values, "{dtype:?}");
        }
        assert_eq!(
            values_to_bytes(&Values::Fp64(vec![1.0]), WireDtype::F32),
            Err(ValueError::Kind)
        );
    }

    #[test]
    fn values_out_of_their_datatype_are_refused_not_wrapped() {
        use WireDtype as D;
        for (values, dtype) in [
            (Values::Int(vec![1000]), D::I8),
            (Values::Int(vec![-129]), D::I8),
            (Values::Int(vec![40_000]), D::I16),
            (Values::Uint(vec![256]), D::U8),
            (Values::Fp32(vec![1e30]), D::F16),
            (Values::Fp32(vec![70_000.0]), D::F16),
            (Values::Fp32(vec![f32::MAX]), D::BF16),
        ] {
            assert_eq!(
                values_to_bytes(&values, dtype),
                Err(ValueError::Range),
                "{values:?} as {dtype:?}"
            );
        }
        let mut w = TensorWriter::with_capacity(D::F32, 1);
        assert_eq!(w.float(1e300), Err(ValueError::Range));
        let mut w = TensorWriter::with_capacity(D::I64, 1);
        assert_eq!(w.int(i128::from(u64::MAX)), Err(ValueError::Range));
        assert_eq!(w.float(1.5), Err(ValueError::Kind));
        // The edges fit; non-finite values from typed contents stay as they are.
        for (values, dtype) in [
            (Values::Int(vec![-128, 127]), D::I8),
            (Values::Fp32(vec![65504.0, -65504.0]), D::F16),
            (Values::Fp32(vec![f32::INFINITY, f32::NAN]), D::F16),
            (Values::Fp32(vec![f32::MAX, f32::INFINITY]), D::F32),
        ] {
            assert!(
                values_to_bytes(&values, dtype).is_ok(),
                "{values:?} {dtype:?}"
            );
        }
    }

    #[test]
    fn json_data_is_written_from_bytes_within_its_bounds() {
        let cases = [
            (
                RawTensor::from_f32(&[0.1, -2.0, f32::NAN, 1e-38], &[4]),
                "[0.1,-2.0,null,1e-38]",
            ),
            (
                RawTensor {
                    data: Bytes::from(vec![0x80, 0x7f, 0]),
                    shape: vec![3],
                    dtype: WireDtype::I8,
                },
                "[-128,127,0]",
            ),
            (
                RawTensor {
                    data: Bytes::from(i64::MIN.to_le_bytes().to_vec()),
                    shape: vec![1],
                    dtype: WireDtype::I64,
                },
                "[-9223372036854775808]",
            ),
            (
                RawTensor {
                    data: Bytes::from(vec![1, 0]),
                    shape: vec![2],
                    dtype: WireDtype::Bool,
                },
                "[true,false]",
            ),
            (
                RawTensor {
                    data: Bytes::from(
                        [f64::MIN_POSITIVE, -1.2345678901234567e-300]
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect::<Vec<_>>(),
                    ),
                    shape: vec![2],
                    dtype: WireDtype::F64,
                },
                "[2.2250738585072014e-308,-1.2345678901234568e-300]",
            ),
        ];
        for (t, want) in cases {
            let got = serde_json::to_string(&JsonData(&t)).unwrap();
            assert_eq!(got, want);
            let (fewest, most) = json_data_bounds(&t);
            let n = got.len() as u64;
            assert!(fewest <= n && n <= most, "{got}: {fewest}..{most}");
        }
        let zeros = RawTensor::from_f32(&[0.0; 3], &[3]);
        assert_eq!(json_data_bounds(&zeros).0, "[0.0,0.0,0.0]".len() as u64);
    }

    #[test]
    fn an_output_requested_twice_is_refused() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_requested_outputs(&names(&["A", "B"])).is_ok());
        let e = check_requested_outputs(&names(&["A", "B", "A"])).unwrap_err();
        assert!(e.0.contains("\"A\" is requested more than once"), "{e}");
    }

    #[test]
    fn outputs_are_named_and_filtered() {
        let t = RawTensor::from_f32(&[1.0], &[1]);
        let all = select_outputs(vec![t.clone(), t.clone()], &[]).unwrap();
        assert_eq!(all[1].0, "OUTPUT__1");
        let one = select_outputs(vec![t.clone(), t.clone()], &["OUTPUT__1".into()]).unwrap();
        assert_eq!(one.len(), 1);
        assert!(select_outputs(vec![t], &["OUT".into()]).is_err());
    }
}
