//! PyTorch 2 AOTInductor packages (`.pt2`, made by `torch.export` and
//! `torch._inductor.aoti_compile_and_package`): [`Package`], the one safe type
//! over the C++ shim `csrc/aoti_shim.cpp` (built by build.rs against the
//! libtorch tch links), and what a package says about itself ([`PackageSpec`]:
//! the names in its call spec, the input checks compiled into it).
//!
//! All `unsafe` of this module is in [`ffi`]'s few functions; like every
//! libtorch call, a package runs only on the engine's loader and worker threads.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

/// The largest generated wrapper source read to learn the inputs' checks.
const MAX_WRAPPER_SOURCE: usize = 64 << 20;

/// A loaded AOTInductor package, ready to run from any thread.
pub struct Package {
    raw: ffi::Handle,
}

impl Package {
    /// Loads the package's model "model" with `runners` model instances (runs
    /// that may go on at once; more wait for one) on CUDA device
    /// `device_index`, or -1 for the device the package was compiled for.
    pub fn load(path: &Path, runners: usize, device_index: i32) -> Result<Package, String> {
        let path = c_path(path)?;
        let raw = ffi::load(&path, runners.max(1), device_index)?;
        Ok(Package { raw })
    }

    /// The metadata compiled into a package (`AOTI_DEVICE_KEY`: "cpu" or
    /// "cuda", ...), read without loading it.
    pub fn metadata_of(path: &Path) -> Result<HashMap<String, String>, String> {
        let path = c_path(path)?;
        ffi::package_metadata(&path)
    }

    /// The generated C++ wrapper's source (`*.wrapper.cpp`) that the package
    /// carries, if it carries one: where its input checks are written.
    pub fn wrapper_source_of(path: &Path) -> Result<Option<String>, String> {
        let path = c_path(path)?;
        ffi::read_record(&path, ".wrapper.cpp", MAX_WRAPPER_SOURCE)
    }

    /// Runs the model on the flattened inputs; returns the flattened outputs.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        ffi::run(&self.raw, inputs)
    }

    /// The loaded package's metadata.
    pub fn metadata(&self) -> Result<HashMap<String, String>, String> {
        ffi::metadata(&self.raw)
    }

    /// The call spec: the inputs' and the outputs' pytree specs (JSON text).
    pub fn call_spec(&self) -> Result<(String, String), String> {
        let mut specs = ffi::call_spec(&self.raw)?.into_iter();
        match (specs.next(), specs.next()) {
            (Some(i), Some(o)) => Ok((i, o)),
            _ => Err("the package has no call spec".into()),
        }
    }
}

fn c_path(path: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path holds a NUL byte".to_string())
}

/// The only unsafe code of this module: the calls into the shim. Every shim
/// function catches every C++ exception and returns it as text, so no
/// exception unwinds into Rust; callbacks only push onto a Vec.
#[allow(unsafe_code)]
mod ffi {
    use std::collections::HashMap;
    use std::ffi::{CStr, CString, c_char, c_void};
    use std::ptr::NonNull;

    use tch::Tensor;
    use torch_sys::C_tensor;

    #[repr(C)]
    pub struct Raw {
        _private: [u8; 0],
    }

    type StrCb = extern "C" fn(*mut c_void, *const c_char, usize);
    type KvCb = extern "C" fn(*mut c_void, *const c_char, usize, *const c_char, usize);
    type TensorCb = extern "C" fn(*mut c_void, *mut C_tensor);

    unsafe extern "C" {
        fn ss_aoti_free_error(e: *mut c_char);
        fn ss_aoti_load(
            path: *const c_char,
            model_name: *const c_char,
            num_runners: usize,
            device_index: i32,
            out: *mut *mut Raw,
        ) -> *mut c_char;
        fn ss_aoti_free(p: *mut Raw);
        fn ss_aoti_run(
            p: *mut Raw,
            inputs: *const *const C_tensor,
            n: usize,
            cb: TensorCb,
            ctx: *mut c_void,
        ) -> *mut c_char;
        fn ss_aoti_metadata(p: *mut Raw, cb: KvCb, ctx: *mut c_void) -> *mut c_char;
        fn ss_aoti_package_metadata(
            path: *const c_char,
            model_name: *const c_char,
            cb: KvCb,
            ctx: *mut c_void,
        ) -> *mut c_char;
        fn ss_aoti_call_spec(p: *mut Raw, cb: StrCb, ctx: *mut c_void) -> *mut c_char;
        fn ss_aoti_read_record(
            path: *const c_char,
            suffix: *const c_char,
            max_bytes: usize,
            cb: StrCb,
            ctx: *mut c_void,
        ) -> *mut c_char;
    }

    /// An owned loader; freed once, on drop.
    pub struct Handle(NonNull<Raw>);

    // SAFETY: the loader is a heap object with no thread affinity; its runs are
    // thread-safe (AOTInductor's model container hands each concurrent run its
    // own model instance and makes further runs wait for one), and metadata and
    // call spec only read what the load wrote.
    unsafe impl Send for Handle {}
    // SAFETY: as for Send: every method the shim exposes may run concurrently.
    unsafe impl Sync for Handle {}

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: the pointer came from ss_aoti_load and is freed only here.
            unsafe { ss_aoti_free(self.0.as_ptr()) }
        }
    }

    const MODEL_NAME: &CStr = c"model";

    /// The shim's error (NULL: none) as a String; frees it.
    fn take_error(e: *mut c_char) -> Result<(), String> {
        if e.is_null() {
            return Ok(());
        }
        // SAFETY: a non-NULL error is a NUL-terminated string from malloc that
        // the shim handed over; it is read once and freed once, here.
        let text = unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned();
        // SAFETY: see above.
        unsafe { ss_aoti_free_error(e) };
        Err(text)
    }

    extern "C" fn push_str(ctx: *mut c_void, s: *const c_char, len: usize) {
        // SAFETY: ctx is the &mut Vec<String> passed with this callback for the
        // duration of the call; (s, len) is a live byte range of the shim's.
        let (out, bytes) = unsafe {
            (
                &mut *(ctx as *mut Vec<String>),
                std::slice::from_raw_parts(s as *const u8, len),
            )
        };
        out.push(String::from_utf8_lossy(bytes).into_owned());
    }

    extern "C" fn push_kv(
        ctx: *mut c_void,
        k: *const c_char,
        kl: usize,
        v: *const c_char,
        vl: usize,
    ) {
        // SAFETY: as in push_str, with a &mut HashMap<String, String>.
        let (out, k, v) = unsafe {
            (
                &mut *(ctx as *mut HashMap<String, String>),
                std::slice::from_raw_parts(k as *const u8, kl),
                std::slice::from_raw_parts(v as *const u8, vl),
            )
        };
        out.insert(
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        );
    }

    extern "C" fn push_tensor(ctx: *mut c_void, t: *mut C_tensor) {
        // SAFETY: ctx is the &mut Vec<Tensor> passed with this callback; t is a
        // new heap at::Tensor (tch's C_tensor) whose ownership the shim hands
        // over: the Tensor frees it on drop, as tch frees its own.
        unsafe { (*(ctx as *mut Vec<Tensor>)).push(Tensor::from_ptr(t)) }
    }

    pub fn load(path: &CString, runners: usize, device_index: i32) -> Result<Handle, String> {
        let mut raw: *mut Raw = std::ptr::null_mut();
        // SAFETY: valid C strings; `raw` receives the new loader or stays NULL.
        take_error(unsafe {
            ss_aoti_load(
                path.as_ptr(),
                MODEL_NAME.as_ptr(),
                runners,
                device_index,
                &mut raw,
            )
        })?;
        NonNull::new(raw)
            .map(Handle)
            .ok_or_else(|| "the loader returned nothing".to_string())
    }

    pub fn run(h: &Handle, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let ptrs: Vec<*const C_tensor> = inputs.iter().map(Tensor::as_ptr).collect();
        let mut out: Vec<Tensor> = Vec::new();
        // SAFETY: the input pointers are borrowed from `inputs`, alive for the
        // call (the shim copies the tensors, which only bumps refcounts);
        // push_tensor takes ownership of each output.
        take_error(unsafe {
            ss_aoti_run(
                h.0.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len(),
                push_tensor,
                &mut out as *mut Vec<Tensor> as *mut c_void,
            )
        })?;
        Ok(out)
    }

    pub fn metadata(h: &Handle) -> Result<HashMap<String, String>, String> {
        let mut out = HashMap::new();
        // SAFETY: a live loader; push_kv fills `out` during the call.
        take_error(unsafe {
            ss_aoti_metadata(h.0.as_ptr(), push_kv, &mut out as *mut _ as *mut c_void)
        })?;
        Ok(out)
    }

    pub fn package_metadata(path: &CString) -> Result<HashMap<String, String>, String> {
        let mut out = HashMap::new();
        // SAFETY: valid C strings; push_kv fills `out` during the call.
        take_error(unsafe {
            ss_aoti_package_metadata(
                path.as_ptr(),
                MODEL_NAME.as_ptr(),
                push_kv,
                &mut out as *mut _ as *mut c_void,
            )
        })?;
        Ok(out)
    }

    pub fn call_spec(h: &Handle) -> Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        // SAFETY: a live loader; push_str fills `out` during the call.
        take_error(unsafe {
            ss_aoti_call_spec(h.0.as_ptr(), push_str, &mut out as *mut _ as *mut c_void)
        })?;
        Ok(out)
    }

    pub fn read_record(path: &CString, suffix: &str, max: usize) -> Result<Option<String>, String> {
        let suffix = CString::new(suffix).map_err(|e| e.to_string())?;
        let mut out: Vec<String> = Vec::new();
        // SAFETY: valid C strings; push_str fills `out` during the call.
        take_error(unsafe {
            ss_aoti_read_record(
                path.as_ptr(),
                suffix.as_ptr(),
                max,
                push_str,
                &mut out as *mut _ as *mut c_void,
            )
        })?;
        Ok(out.pop())
    }
}

/// One dimension of a package input, as its compiled checks constrain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimSpec {
    Static(i64),
    /// Exported with a `Dim`: any size in min..=max (max None: unbounded).
    Dynamic {
        min: i64,
        max: Option<i64>,
    },
}

/// One input of a package: its dtype and dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub kind: Kind,
    pub dims: Vec<DimSpec>,
}

/// What a package's generated wrapper checks of its inputs, one per input in
/// the order `run` takes them; None when the source is missing or says
/// something this reading does not recognise (the package still checks its
/// inputs itself: see csrc/aoti_shim.cpp).
pub fn input_specs(wrapper: &str) -> Option<Vec<InputSpec>> {
    let mut specs = Vec::new();
    for i in 0.. {
        let head = format!("static void check_input_{i}(");
        let Some(start) = wrapper.find(&head) else {
            break;
        };
        let body = &wrapper[start + head.len()..];
        let end = body
            .find("static void check_input_")
            .or_else(|| body.find("_check_aoti_runtime_check_inputs_env"))
            .unwrap_or(body.len());
        specs.push(parse_check(&body[..end])?);
    }
    (!specs.is_empty()).then_some(specs)
}

/// One `check_input_N` function's body: its dtype, size and stride checks.
fn parse_check(body: &str) -> Option<InputSpec> {
    let dtype = body.split("aoti_torch_dtype_").nth(1)?;
    let dtype = &dtype[..dtype.find("()")?];
    let kind = match dtype {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "float16" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" => Kind::Int64,
        "int32" => Kind::Int,
        "int16" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    };
    // `if (4 != x_size[1])`, `if (x_size[0] < 2)`, `if (x_size[0] > 1024)`,
    // `if (4 != x_stride[0])`: every dimension has a stride or size check.
    let mut rank = 0usize;
    let mut fixed: HashMap<usize, i64> = HashMap::new();
    let mut lower: HashMap<usize, i64> = HashMap::new();
    let mut upper: HashMap<usize, i64> = HashMap::new();
    for line in body.lines() {
        let Some(cond) = line
            .trim()
            .strip_prefix("if (")
            .and_then(|c| c.strip_suffix(") {"))
        else {
            continue;
        };
        let index = |s: &str, what: &str| -> Option<usize> {
            let at = s.find(what)?;
            let rest = &s[at + what.len()..];
            rest[..rest.find(']')?].parse().ok()
        };
        let parts: Vec<&str> = cond.split_whitespace().collect();
        let [a, op, b] = parts.as_slice() else {
            continue;
        };
        for what in ["_size[", "_stride["] {
            for side in [a, b] {
                if let Some(d) = index(side, what) {
                    rank = rank.max(d + 1);
                }
            }
        }
        match (index(a, "_size["), index(b, "_size["), *op) {
            (None, Some(d), "!=") => {
                fixed.insert(d, a.parse().ok()?);
            }
            (Some(d), None, "<") => {
                lower.insert(d, b.parse().ok()?);
            }
            (Some(d), None, ">") => {
                upper.insert(d, b.parse().ok()?);
            }
            _ => {}
        }
    }
    let dims = (0..rank)
        .map(|d| match fixed.get(&d) {
            Some(&n) => DimSpec::Static(n),
            None => DimSpec::Dynamic {
                min: lower.get(&d).copied().unwrap_or(0),
                max: upper.get(&d).copied(),
            },
        })
        .collect();
    Some(InputSpec { kind, dims })
}

/// The names of the leaves of a call spec's pytree (JSON as
/// `torch.utils._pytree.treespec_dumps` writes it), in flattened order:
/// a keyword argument or dict entry is named by its key, anything else
/// `{prefix}{position}` (Triton's INPUT__0, OUTPUT__0 convention).
/// None for a spec this reading does not understand.
pub fn leaf_names(spec_json: &str, prefix: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(spec_json).ok()?;
    let root = v.as_array()?.get(1)?;
    let mut keyed = Vec::new();
    collect(root, None, &mut keyed)?;
    let mut seen = std::collections::HashSet::new();
    Some(
        keyed
            .into_iter()
            .enumerate()
            .map(|(i, key)| match key {
                Some(k) if seen.insert(k.clone()) => k,
                _ => format!("{prefix}{i}"),
            })
            .collect(),
    )
}

/// Depth-first leaves, each with the dict key it sits under (when its parent is a dict).
fn collect(
    node: &serde_json::Value,
    key: Option<String>,
    out: &mut Vec<Option<String>>,
) -> Option<()> {
    let children = node.get("children_spec")?.as_array()?;
    if node.get("type").is_none_or(|t| t.is_null()) {
        out.push(key);
        return Some(());
    }
    let ty = node.get("type")?.as_str()?;
    let keys: Option<Vec<String>> = if ty.ends_with("dict") || ty.ends_with("OrderedDict") {
        let context = node.get("context")?.as_str()?;
        let list: Vec<serde_json::Value> = serde_json::from_str(context).ok()?;
        Some(
            list.iter()
                .map(|k| match k {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
        )
    } else {
        None
    };
    for (i, child) in children.iter().enumerate() {
        let k = keys.as_ref().and_then(|ks| ks.get(i).cloned());
        collect(child, k, out)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: &str = r#"
AOTI_NOINLINE static void check_input_0(
    AtenTensorHandle* input_handles
) {
    int32_t arg4_1_expected_dtype = aoti_torch_dtype_float32();
    if (arg4_1_size[0] < 2) {
    if (arg4_1_size[0] > 1024) {
    if (4 != arg4_1_size[1]) {
    if (4 != arg4_1_stride[0]) {
    if (1 != arg4_1_stride[1]) {
}
AOTI_NOINLINE static void check_input_1(
    AtenTensorHandle* input_handles
) {
    int32_t b_expected_dtype = aoti_torch_dtype_int64();
    if (2 != b_size[0]) {
    if (1 != b_stride[0]) {
}
static bool _check_aoti_runtime_check_inputs_env() {
"#;

    #[test]
    fn input_checks_give_dtypes_and_static_and_dynamic_dims() {
        let specs = input_specs(CHECK).unwrap();
        assert_eq!(
            specs,
            vec![
                InputSpec {
                    kind: Kind::Float,
                    dims: vec![
                        DimSpec::Dynamic {
                            min: 2,
                            max: Some(1024)
                        },
                        DimSpec::Static(4)
                    ]
                },
                InputSpec {
                    kind: Kind::Int64,
                    dims: vec![DimSpec::Static(2)]
                },
            ]
        );
        assert_eq!(input_specs("no checks here"), None);
        // Compiled without the lower-bound check (aot_inductor.check_lowerbound
        // off): no minimum, so no padding.
        let no_lower = CHECK.replace("    if (arg4_1_size[0] < 2) {\n", "");
        assert_eq!(
            input_specs(&no_lower).unwrap()[0].dims[0],
            DimSpec::Dynamic {
                min: 0,
                max: Some(1024)
            }
        );
    }

    #[test]
    fn call_specs_name_keyword_arguments_and_number_the_rest() {
        let positional = r#"[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", "context": "null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, {"type": "builtins.dict", "context": "[]", "children_spec": []}]}]"#;
        assert_eq!(leaf_names(positional, "INPUT__").unwrap(), ["INPUT__0"]);
        let kwargs = r#"[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", "context": "null", "children_spec": []}, {"type": "builtins.dict", "context": "[\"a\", \"b\"]", "children_spec": [{"type": null, "context": null, "children_spec": []}, {"type": null, "context": null, "children_spec": []}]}]}]"#;
        assert_eq!(leaf_names(kwargs, "INPUT__").unwrap(), ["a", "b"]);
        let tuple = r#"[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": null, "context": null, "children_spec": []}, {"type": null, "context": null, "children_spec": []}]}]"#;
        assert_eq!(
            leaf_names(tuple, "OUTPUT__").unwrap(),
            ["OUTPUT__0", "OUTPUT__1"]
        );
        assert_eq!(leaf_names("not json", "X"), None);
    }
}
