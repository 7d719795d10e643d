//! Serving an AOTInductor package (`.pt2`): loading it on the device it was
//! compiled for, its input names (the call spec), the input checks compiled
//! into it (which dimensions are dynamic drives batching), and running it.

use std::path::Path;

use tch::{Device, Tensor};

use super::aoti::{self, DimSpec, InputSpec, Package};
use super::{ModelError, Signature, TensorSig, torch_text};
use crate::codec::WireDtype;

/// A loaded package and what it says about itself.
pub(super) struct Pt2 {
    package: Package,
    /// Per input, as the package checks it; None when it does not say.
    inputs: Option<Vec<InputSpec>>,
    pub(super) input_names: Vec<String>,
    pub(super) output_names: Vec<String>,
}

/// How a package takes the batch dimension (dimension 0 of every input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageBatch {
    /// Exported with a `Dim` for dimension 0: batches of min..=max rows.
    Dynamic { min: i64, max: Option<i64> },
    /// Exported for exactly this many rows.
    Static(i64),
    /// The package does not say (no readable input checks).
    Unknown,
}

/// What front-ends and the engine learn of a package.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageInfo {
    pub input_names: Vec<String>,
    pub output_names: Vec<String>,
    pub batch: PackageBatch,
}

/// Loads a package for a device; returns it and the device it runs on
/// (the one it was compiled for: a CPU package runs on the CPU).
pub(super) fn load(path: &Path, device: Device, runners: usize) -> Result<(Pt2, Device), String> {
    let meta = Package::metadata_of(path).map_err(|e| not_a_package(&e))?;
    let compiled_for = meta
        .get("AOTI_DEVICE_KEY")
        .map(String::as_str)
        .unwrap_or("cpu");
    let (device, index) = match (compiled_for, device) {
        ("cpu", _) => (Device::Cpu, -1),
        ("cuda", Device::Cuda(n)) => (Device::Cuda(n), n as i32),
        ("cuda", _) => {
            return Err(
                "the package was compiled for CUDA and this server runs models on the CPU \
                 (no CUDA device here, or --device cpu): serve it on a GPU, or compile the \
                 package again with the model and example inputs on the CPU"
                    .into(),
            );
        }
        (other, _) => {
            return Err(format!(
                "the package was compiled for device {:?}; splitserve runs CPU and CUDA packages",
                crate::codec::clip(other)
            ));
        }
    };
    if let Some(missing) = missing_cpu_features(meta.get("AOTI_CPU_ISA").map(String::as_str)) {
        return Err(format!(
            "the package was compiled for a CPU with {missing}, which this CPU lacks: \
             compile it on the CPU type the server runs on"
        ));
    }
    let inputs = Package::wrapper_source_of(path)
        .ok()
        .flatten()
        .and_then(|src| aoti::input_specs(&src));
    let package = Package::load(path, runners, index).map_err(|e| torch_text(&e, true))?;
    let (in_spec, out_spec) = package.call_spec().map_err(|e| torch_text(&e, true))?;
    let input_names = aoti::leaf_names(&in_spec, "INPUT__")
        .ok_or("the package's call spec (inputs) is not readable")?;
    let output_names = aoti::leaf_names(&out_spec, "OUTPUT__")
        .ok_or("the package's call spec (outputs) is not readable")?;
    if let Some(specs) = &inputs {
        if specs.len() != input_names.len() {
            return Err(format!(
                "the package checks {} inputs but its call spec names {}",
                specs.len(),
                input_names.len()
            ));
        }
    }
    Ok((
        Pt2 {
            package,
            inputs,
            input_names,
            output_names,
        },
        device,
    ))
}

/// The instruction sets a package's `AOTI_CPU_ISA` names that this CPU's
/// flags (/proc/cpuinfo) lack, or None. Code compiled for them would stop the
/// whole process with SIGILL on its first run.
fn missing_cpu_features(isa: Option<&str>) -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    missing_in(isa?, &cpuinfo)
}

fn missing_in(isa: &str, cpuinfo: &str) -> Option<String> {
    let flags: std::collections::HashSet<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .split_once(':')?
        .1
        .split_whitespace()
        .collect();
    let missing: Vec<&str> = isa
        .split_whitespace()
        .filter(|name| {
            let flag = match *name {
                "AVX2" => "avx2",
                "AVX512" => "avx512f",
                "AVX512_VNNI" => "avx512_vnni",
                "AVX512_BF16" => "avx512_bf16",
                "AMX_TILE" => "amx_tile",
                "AMX_BF16" => "amx_bf16",
                "AMX_INT8" => "amx_int8",
                "AMX_FP16" => "amx_fp16",
                // Not an x86 set this check knows: not refused here.
                _ => return false,
            };
            !flags.contains(flag)
        })
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// A load error's text, with what to do when the file is no package at all.
fn not_a_package(raw: &str) -> String {
    let msg = torch_text(raw, true);
    format!(
        "{msg}. This file is not a readable AOTInductor package: make one with \
         torch._inductor.aoti_compile_and_package(torch.export.export(model, args), \
         package_path=\"model.pt2\") with this server's torch version ({})",
        env!("SPLITSERVE_TORCH_VERSION")
    )
}

impl Pt2 {
    pub(super) fn info(&self) -> PackageInfo {
        let batch = match self.inputs.as_deref() {
            Some([first, ..]) => match first.dims.first() {
                Some(DimSpec::Dynamic { min, max }) => PackageBatch::Dynamic {
                    min: *min,
                    max: *max,
                },
                Some(DimSpec::Static(n)) => PackageBatch::Static(*n),
                None => PackageBatch::Unknown,
            },
            _ => PackageBatch::Unknown,
        };
        PackageInfo {
            input_names: self.input_names.clone(),
            output_names: self.output_names.clone(),
            batch,
        }
    }

    /// Zero inputs of the smallest sizes the package takes, `extra` rows more
    /// in every dynamic dimension 0; None when the inputs are not known.
    pub(super) fn warmup_inputs(&self, device: Device, extra: i64) -> Option<Vec<Tensor>> {
        let specs = self.inputs.as_ref()?;
        specs
            .iter()
            .map(|s| {
                let shape: Vec<i64> = s
                    .dims
                    .iter()
                    .enumerate()
                    .map(|(d, dim)| match dim {
                        DimSpec::Static(n) => *n,
                        DimSpec::Dynamic { min, max } => {
                            let n = (*min).max(1) + if d == 0 { extra } else { 0 };
                            max.map_or(n, |m| n.min(m))
                        }
                    })
                    .collect();
                Tensor::f_zeros(&shape, (s.kind, device)).ok()
            })
            .collect()
    }

    /// The signature: inputs as the package checks them (-1 where dynamic);
    /// outputs as two warm-up runs showed them (-1 where they differed).
    pub(super) fn signature(&self, a: &[Tensor], b: Option<&[Tensor]>) -> Option<Signature> {
        let specs = self.inputs.as_ref()?;
        let inputs = specs
            .iter()
            .map(|s| {
                Some(TensorSig {
                    dtype: WireDtype::from_kind(s.kind)?,
                    shape: s
                        .dims
                        .iter()
                        .map(|d| match d {
                            DimSpec::Static(n) => *n,
                            DimSpec::Dynamic { .. } => -1,
                        })
                        .collect(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let outputs = a
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut shape = t.size();
                if let Some(other) = b.and_then(|b| b.get(i)) {
                    for (d, o) in shape.iter_mut().zip(other.size()) {
                        if *d != o {
                            *d = -1;
                        }
                    }
                }
                Some(TensorSig {
                    dtype: WireDtype::from_kind(t.kind())?,
                    shape,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Signature { inputs, outputs })
    }

    /// Runs the package after checking the inputs against what it was
    /// exported for (a clear message instead of the package's own); a batch
    /// below the package's smallest is padded with zero rows and cut back.
    pub(super) fn run(&self, model: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let invalid = |message: String| ModelError::InvalidInput {
            model: model.to_string(),
            message,
        };
        if inputs.len() != self.input_names.len() {
            return Err(invalid(format!(
                "the package takes {} input(s) ({}), not {}",
                self.input_names.len(),
                self.input_names.join(", "),
                inputs.len()
            )));
        }
        let mut pad_to: Option<(i64, i64)> = None;
        if let Some(specs) = &self.inputs {
            for ((t, s), name) in inputs.iter().zip(specs).zip(&self.input_names) {
                let shape = t.size();
                if t.kind() != s.kind {
                    return Err(invalid(format!(
                        "input {name} is {:?}; the package takes {:?}",
                        t.kind(),
                        s.kind
                    )));
                }
                let wanted = || {
                    let dims: Vec<String> = s
                        .dims
                        .iter()
                        .map(|d| match d {
                            DimSpec::Static(n) => n.to_string(),
                            DimSpec::Dynamic { max: Some(m), .. } => format!("1..{m}"),
                            DimSpec::Dynamic { max: None, .. } => "any".into(),
                        })
                        .collect();
                    format!("[{}]", dims.join(", "))
                };
                if shape.len() != s.dims.len() {
                    return Err(invalid(format!(
                        "input {name} has shape {shape:?}; the package takes {}",
                        wanted()
                    )));
                }
                for (d, (&got, dim)) in shape.iter().zip(&s.dims).enumerate() {
                    match *dim {
                        DimSpec::Static(n) if got != n && d == 0 => {
                            return Err(invalid(format!(
                                "input {name} has a batch of {got} rows; the package was exported \
                                 with a static batch of {n} (shape {}): export it with a \
                                 torch.export.Dim for dimension 0 to serve other batch sizes",
                                wanted()
                            )));
                        }
                        DimSpec::Static(n) if got != n => {
                            return Err(invalid(format!(
                                "input {name} has shape {shape:?}; the package takes {} \
                                 (dimension {d} is static)",
                                wanted()
                            )));
                        }
                        DimSpec::Dynamic { min, max } => {
                            if got < 1 || max.is_some_and(|m| got > m) {
                                return Err(invalid(format!(
                                    "input {name} has shape {shape:?}; the package takes {}",
                                    wanted()
                                )));
                            }
                            if got < min {
                                // Only the batch dimension is padded, and only when
                                // every input agrees on it.
                                match (d, pad_to) {
                                    (0, None) => pad_to = Some((got, min)),
                                    (0, Some((rows, _))) if rows == got => {}
                                    _ => {
                                        return Err(invalid(format!(
                                            "input {name}: dimension {d} is {got}; the package \
                                             takes at least {min} there"
                                        )));
                                    }
                                }
                            }
                        }
                        DimSpec::Static(_) => {}
                    }
                }
            }
        }
        let internal = |e: tch::TchError| ModelError::Internal {
            model: model.to_string(),
            message: torch_text(&e.to_string(), true),
        };
        // The package checks strides too: contiguous inputs, padded if need be.
        let prepared = inputs
            .iter()
            .map(|t| {
                let t = t.f_contiguous()?;
                match pad_to {
                    Some((rows, min)) if t.size().first() == Some(&rows) => {
                        let mut shape = t.size();
                        shape[0] = min - rows;
                        let zeros = Tensor::f_zeros(&shape, (t.kind(), t.device()))?;
                        Tensor::f_cat(&[t, zeros], 0)
                    }
                    _ => Ok(t),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        let outputs = self
            .package
            .run(&prepared)
            .map_err(|e| ModelError::InvalidInput {
                model: model.to_string(),
                message: torch_text(&e, false),
            })?;
        match pad_to {
            Some((rows, min)) => outputs
                .into_iter()
                .map(|y| match y.size().first() {
                    Some(&n) if n == min => y.f_narrow(0, 0, rows).map_err(internal),
                    _ => Ok(y),
                })
                .collect(),
            None => Ok(outputs),
        }
    }
}

/// Triton's platform name for AOTInductor packages.
pub const PLATFORM: &str = "torch_aoti";

/// A package's model configuration: `base` (its config.pbtxt, if any) with
/// what it leaves out filled from the package: inputs and outputs named from
/// the call spec, dtypes and dims from its input checks and warm-up, and
/// max_batch_size from its batch dimension (a static batch: 0, Triton's "no
/// batch dimension", and the full shape in dims). An error names a config
/// that contradicts the package.
pub fn package_config(
    name: &str,
    info: &PackageInfo,
    signature: Option<&Signature>,
    base: Option<&crate::proto::inference::ModelConfig>,
) -> Result<crate::proto::inference::ModelConfig, String> {
    use crate::proto::inference as pb;
    let mut cfg = base.cloned().unwrap_or_default();
    if cfg.name.is_empty() {
        cfg.name = name.to_string();
    }
    cfg.platform = PLATFORM.into();
    cfg.backend = "pytorch".into();
    if cfg.default_model_filename.is_empty() {
        cfg.default_model_filename = "model.pt2".into();
    }
    match info.batch {
        PackageBatch::Static(n) if cfg.max_batch_size > 0 => {
            return Err(format!(
                "max_batch_size is {} but the package was exported with a static batch of {n} \
                 rows: set max_batch_size: 0 and give the whole shape in dims, or export it \
                 with a torch.export.Dim for dimension 0",
                cfg.max_batch_size
            ));
        }
        PackageBatch::Dynamic { max: Some(m), .. } if i64::from(cfg.max_batch_size) > m => {
            return Err(format!(
                "max_batch_size is {} but the package takes at most {m} rows",
                cfg.max_batch_size
            ));
        }
        PackageBatch::Dynamic { max, .. } if cfg.input.is_empty() && cfg.max_batch_size == 0 => {
            cfg.max_batch_size = i32::try_from(max.unwrap_or(i64::from(i32::MAX)))
                .unwrap_or(i32::MAX)
                .max(1);
        }
        _ => {}
    }
    let batched = cfg.max_batch_size > 0;
    let dims =
        |shape: &[i64]| -> Vec<i64> { shape.iter().skip(usize::from(batched)).copied().collect() };
    let data_type = |d: WireDtype| pb::DataType::from(d) as i32;
    let unknown = || {
        "the package carries no input checks splitserve can read: list its inputs and \
         outputs (name, data_type, dims) in config.pbtxt"
            .to_string()
    };
    if cfg.input.is_empty() {
        let sig = signature.ok_or_else(unknown)?;
        cfg.input = info
            .input_names
            .iter()
            .zip(&sig.inputs)
            .map(|(n, t)| pb::ModelInput {
                name: n.clone(),
                data_type: data_type(t.dtype),
                dims: dims(&t.shape),
                ..Default::default()
            })
            .collect();
    } else if cfg.input.len() != info.input_names.len() {
        return Err(format!(
            "config.pbtxt lists {} input(s); the package takes {} ({})",
            cfg.input.len(),
            info.input_names.len(),
            info.input_names.join(", ")
        ));
    }
    if cfg.output.is_empty() {
        let sig = signature.ok_or_else(unknown)?;
        cfg.output = info
            .output_names
            .iter()
            .zip(&sig.outputs)
            .map(|(n, t)| pb::ModelOutput {
                name: n.clone(),
                data_type: data_type(t.dtype),
                dims: dims(&t.shape),
                ..Default::default()
            })
            .collect();
    } else if cfg.output.len() != info.output_names.len() {
        return Err(format!(
            "config.pbtxt lists {} output(s); the package returns {} ({})",
            cfg.output.len(),
            info.output_names.len(),
            info.output_names.join(", ")
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_for_a_cpu_with_more_instruction_sets_is_refused_by_name() {
        let cpuinfo = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni\n";
        assert_eq!(missing_in("AVX512 AVX512_VNNI", cpuinfo), None);
        assert_eq!(
            missing_in("AVX512 AVX512_VNNI AMX_TILE", cpuinfo).as_deref(),
            Some("AMX_TILE")
        );
        assert_eq!(missing_in("NEON", cpuinfo), None);
    }
}
