//! `config.pbtxt`: Triton's model configuration, parsed as protobuf text format
//! by reflection against `proto/inference/model_config.proto`, then checked and
//! turned into what the engine runs ([`Settings`]).
//!
//! Every field that is set is either applied, or named in a warning at load
//! ([`Parsed::warnings`]); a config that cannot work is an error naming why.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use tch::Kind;

use crate::model::DeviceRequest;
use crate::proto::inference::{
    self as pb, DataType, ModelConfig, model_config::SchedulingChoice,
    model_instance_group::Kind as GroupKind, model_queue_policy::TimeoutAction,
};
use crate::training::{AdamBetas, OptimizerKind, OptimizerSettings};

/// Platform and backend names of Triton's PyTorch backend.
pub const PLATFORM: &str = "pytorch_libtorch";
pub const BACKEND: &str = "pytorch";
/// The model file in each version directory unless `default_model_filename` says otherwise.
pub const DEFAULT_MODEL_FILENAME: &str = "model.pt";
/// Triton's platform for AOTInductor packages, and their default file name.
pub const PT2_PLATFORM: &str = crate::model::PT2_PLATFORM;
pub const PT2_FILENAME: &str = "model.pt2";
/// Largest config.pbtxt read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// splitserve's own settings, as `parameters` keys of config.pbtxt.
pub mod keys {
    pub const TRAINABLE: &str = "splitserve.trainable";
    pub const OPTIMIZER: &str = "splitserve.optimizer";
    pub const LEARNING_RATE: &str = "splitserve.learning_rate";
    pub const MOMENTUM: &str = "splitserve.momentum";
    pub const WEIGHT_DECAY: &str = "splitserve.weight_decay";
    pub const ADAM_BETAS: &str = "splitserve.adam_betas";
    pub const ADAM_EPS: &str = "splitserve.adam_eps";
    pub const WARMUP_SHAPE: &str = "splitserve.warmup_shape";
    /// KV caches stay on the server between decode steps (`--kv-sessions`).
    pub const KV_SESSIONS: &str = "splitserve.kv_sessions";
    /// What splitserve-export records of a trunk (its longest context, and
    /// layers x key/value heads x head dimension); read by tools, not applied.
    pub const MAX_CONTEXT: &str = "splitserve.max_context";
    pub const KV_SHAPE: &str = "splitserve.kv_shape";
    pub const ALL: [&str; 11] = [
        TRAINABLE,
        OPTIMIZER,
        LEARNING_RATE,
        MOMENTUM,
        WEIGHT_DECAY,
        ADAM_BETAS,
        ADAM_EPS,
        WARMUP_SHAPE,
        KV_SESSIONS,
        MAX_CONTEXT,
        KV_SHAPE,
    ];
}

/// Fields splitserve applies. A path covers everything below it.
const APPLIED: [&str; 22] = [
    "name",
    "platform",
    "backend",
    "version_policy",
    "max_batch_size",
    "input.name",
    "input.data_type",
    "input.dims",
    "output.name",
    "output.data_type",
    "output.dims",
    "dynamic_batching.preferred_batch_size",
    "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "dynamic_batching.default_queue_policy.default_timeout_microseconds",
    "dynamic_batching.default_queue_policy.timeout_action",
    "dynamic_batching.default_queue_policy.allow_timeout_override",
    "instance_group.count",
    "instance_group.kind",
    "instance_group.gpus",
    "default_model_filename",
    "model_warmup",
];

/// Fields that are checked rather than applied: they either cannot work here
/// (an error) or have no effect to warn about.
const CHECKED: [&str; 5] = [
    "instance_group.name",
    "sequence_batching",
    "ensemble_scheduling",
    "model_transaction_policy",
    "parameters",
];

/// A parsed config: the message as written and the fields it sets that
/// splitserve does not apply.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub config: ModelConfig,
    pub warnings: Vec<String>,
}

/// What the engine runs a model with, read from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Rows one batched forward may join (1: no dynamic batching).
    pub max_batch: usize,
    pub batch_timeout: Duration,
    /// A partial batch of one of these sizes runs without waiting further.
    pub preferred_batch: Vec<usize>,
    /// Requests the model's queue holds (None: the server's --queue-capacity).
    pub queue_capacity: Option<usize>,
    /// Longest a request waits in the queue before it is rejected.
    pub queue_timeout: Option<Duration>,
    /// Whether a request's own timeout may be shorter than `queue_timeout`.
    pub allow_timeout_override: bool,
    /// Forwards of this model that may run at once (instance_group counts).
    pub instances: Option<usize>,
    /// Where it runs (instance_group kind and gpus); None: the server's --device.
    pub device: Option<DeviceRequest>,
    pub trainable: bool,
    /// KV sessions on (`splitserve.kv_sessions`): loaded at start, like a trainable model.
    pub kv_sessions: bool,
    pub optimizer: OptimizerSettings,
    pub learning_rate: Option<f64>,
    /// Warm-up input shapes and dtypes, one per input.
    pub warmup: Option<Vec<(Vec<i64>, Kind)>>,
    /// model_warmup's samples, run at load; a data file's path is relative to
    /// the model directory's `warmup/` until the repository resolves it.
    pub warmup_samples: Vec<crate::model::WarmupSample>,
    /// model_warmup samples skipped, and why: for the load warning.
    pub warmup_warnings: Vec<String>,
}

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| format!("the ModelConfig descriptor does not decode: {e}"))
}

/// Parses config.pbtxt text. An error names the line and column and what the
/// parser expected, never the file's text: the file may be anything a symlink
/// points at, and the error reaches every client that may read the index.
pub fn parse(text: &str) -> Result<Parsed, String> {
    let desc = pool()?
        .get_message_by_name("inference.ModelConfig")
        .ok_or("the ModelConfig descriptor is missing")?;
    let (fixed, inserted) = colon_before_lists(text);
    let msg = DynamicMessage::parse_text_format(desc, &fixed)
        .map_err(|e| parse_error(&e, text, &inserted))?;
    let mut unapplied = BTreeSet::new();
    walk(&msg, "", &mut unapplied);
    let config: ModelConfig = msg
        .transcode_to()
        .map_err(|e| format!("config.pbtxt does not convert: {e}"))?;
    let mut warnings: Vec<String> = unapplied
        .into_iter()
        .map(|path| format!("field `{path}` is not supported by splitserve and is ignored"))
        .collect();
    for key in config.parameters.keys() {
        if key.starts_with("splitserve.") {
            if !keys::ALL.contains(&key.as_str()) {
                warnings.push(format!(
                    "parameter {:?} is not a splitserve setting (known: {}) and is ignored",
                    crate::codec::clip(key),
                    keys::ALL.join(", ")
                ));
            }
        } else {
            warnings.push(format!(
                "parameter {:?} is not a splitserve setting and is ignored",
                crate::codec::clip(key)
            ));
        }
    }
    if config.instance_group.len() > 1 {
        warnings.push(format!(
            "{} instance groups: their counts are added up and the first group's device is used",
            config.instance_group.len()
        ));
    }
    Ok(Parsed { config, warnings })
}

/// The 1-based line and column (in characters) of byte `offset` of `bytes`.
pub fn line_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, column)
}

/// A text-format parse error as one sentence without the file's text: where
/// (line, column of the original text, before [`colon_before_lists`] inserted
/// `inserted`) and what kind of mistake, with names taken from the
/// ModelConfig descriptor only.
///
/// prost-reflect exposes neither the error's kind nor its position but through
/// Debug (`ParseError { kind: Kind { .., span: A..B } }`, the span last) and
/// Display; the unit tests pin both for the version in Cargo.lock.
fn parse_error(
    e: &prost_reflect::text_format::ParseError,
    text: &str,
    inserted: &[usize],
) -> String {
    let debug = format!("{e:?}");
    let kind: String = debug
        .split_once("kind: ")
        .map(|(_, rest)| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect()
        })
        .unwrap_or_default();
    let offset = debug.rsplit_once("span: ").and_then(|(_, rest)| {
        rest.split_once("..")
            .and_then(|(start, _)| start.parse::<usize>().ok())
    });
    let shown = e.to_string();
    // Display texts whose leading part is the parser's own words; the rest quotes the file.
    let before = |sep: &str| shown.split_once(sep).map(|(a, _)| a.to_string());
    let after = |sep: &str| shown.rsplit_once(sep).map(|(_, b)| b.to_string());
    let what = match kind.as_str() {
        "InvalidToken" => Some("an invalid token".to_string()),
        "InvalidStringCharacters" => Some("invalid characters in a string".to_string()),
        "InvalidStringEscape" => Some("an invalid escape in a string".to_string()),
        "InvalidUtf8String" => Some("a string that is not UTF-8".to_string()),
        "NoSpaceBetweenIntAndIdent" => Some("a number directly followed by a name".to_string()),
        "UnexpectedToken" => before(", but found").map(|x| format!("{x} here")),
        "UnexpectedEof" => Some(shown.clone()),
        "IntegerValueOutOfRange" => {
            before(", but the value").map(|x| format!("{x}; the value is out of range"))
        }
        "FieldNotFound" => {
            after(" not found for message ").map(|m| format!("an unknown field for message {m}"))
        }
        "FieldAlreadySet" => Some("a field set twice".to_string()),
        "OneofAlreadySet" => Some(shown.clone()),
        "ExtensionNotFound" => Some("an unknown extension".to_string()),
        "MessageNotFound" => Some("an unknown message type".to_string()),
        "EnumValueNotFound" => {
            after(" was not found for enum ").map(|n| format!("an unknown value for enum {n}"))
        }
        "InvalidTypeForAny" | "InvalidMapKey" => Some(shown.clone()),
        _ => None,
    }
    .unwrap_or_else(|| "a syntax error".to_string());
    let what = crate::codec::clip(&what);
    match offset {
        Some(at) => {
            let at = at.saturating_sub(inserted.iter().filter(|&&p| p < at).count());
            let (line, column) = line_column(text.as_bytes(), at);
            format!("config.pbtxt is not a valid ModelConfig: line {line}, column {column}: {what}")
        }
        None => format!("config.pbtxt is not a valid ModelConfig: {what}"),
    }
}

/// Writes `field: [` for `field [`. Protobuf's text format lets a message
/// field's colon be left out, also before a list, and Triton's configs do
/// (`input [ { ... } ]`); the parser used here wants it before a list. Tokens
/// are tracked so that strings and comments are left alone, and a `[` after a
/// value (`kind: KIND_CPU [`) is not touched. Returns the text and the byte
/// offsets, in it, of the colons inserted.
fn colon_before_lists(text: &str) -> (String, Vec<usize>) {
    #[derive(PartialEq, Clone, Copy)]
    enum Tok {
        Ident,
        Colon,
        Other,
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted = Vec::new();
    let mut last = (Tok::Other, Tok::Other);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                out.push(c);
                for c in chars.by_ref() {
                    out.push(c);
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                out.push(c);
                while let Some(s) = chars.next() {
                    out.push(s);
                    if s == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if s == c {
                        break;
                    }
                }
                last = (last.1, Tok::Other);
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                out.push(c);
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' || n == '.' {
                        out.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                last = (last.1, Tok::Ident);
            }
            c if c.is_whitespace() => out.push(c),
            '[' => {
                // A field name (an identifier not itself a value after ':').
                if last.1 == Tok::Ident && last.0 != Tok::Colon {
                    inserted.push(out.len());
                    out.push(':');
                }
                out.push(c);
                last = (last.1, Tok::Other);
            }
            ':' => {
                out.push(c);
                last = (last.1, Tok::Colon);
            }
            _ => {
                out.push(c);
                last = (last.1, Tok::Other);
            }
        }
    }
    (out, inserted)
}

/// Collects the paths of set fields that are neither applied nor checked.
fn walk(msg: &DynamicMessage, prefix: &str, out: &mut BTreeSet<String>) {
    for (field, value) in msg.fields() {
        let path = if prefix.is_empty() {
            field.name().to_string()
        } else {
            format!("{prefix}.{}", field.name())
        };
        let covered = |list: &[&str]| {
            list.iter()
                .any(|p| path == *p || path.starts_with(&format!("{p}.")))
        };
        if covered(&APPLIED) || covered(&CHECKED) {
            continue;
        }
        // Name the innermost fields set, or the message itself when it is empty.
        let mut visit = |m: &DynamicMessage| {
            if m.fields().next().is_none() {
                out.insert(path.clone());
            } else {
                walk(m, &path, out);
            }
        };
        match value {
            Value::Message(m) => visit(m),
            Value::List(items) if items.iter().all(|i| matches!(i, Value::Message(_))) => {
                for item in items {
                    if let Value::Message(m) = item {
                        visit(m);
                    }
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

/// Checks a parsed config of the model in directory `dir_name` and fills in
/// what Triton would (name, platform); returns the settings it asks for.
pub fn check(config: &mut ModelConfig, dir_name: &str) -> Result<Settings, String> {
    if config.name.is_empty() {
        config.name = dir_name.to_string();
    } else if config.name != dir_name {
        return Err(format!(
            "name {:?} differs from its directory {dir_name:?}",
            crate::codec::clip(&config.name)
        ));
    }
    // An AOTInductor package: Triton's platform "torch_aoti", or the PyTorch
    // backend with a .pt2 model file.
    let pt2 = match (config.platform.as_str(), config.backend.as_str()) {
        (PT2_PLATFORM, BACKEND | "") => true,
        (PLATFORM | "", BACKEND | "") => config.default_model_filename.ends_with(".pt2"),
        (p, b) => {
            return Err(format!(
                "platform {:?} / backend {:?}: splitserve runs TorchScript models \
                 (platform \"{PLATFORM}\" or backend \"{BACKEND}\") and AOTInductor \
                 packages (platform \"{PT2_PLATFORM}\")",
                crate::codec::clip(p),
                crate::codec::clip(b)
            ));
        }
    };
    config.platform = if pt2 { PT2_PLATFORM } else { PLATFORM }.into();
    config.backend = BACKEND.into();
    if pt2 && config.default_model_filename.is_empty() {
        config.default_model_filename = PT2_FILENAME.into();
    }
    match &config.scheduling_choice {
        Some(SchedulingChoice::SequenceBatching(_)) => {
            return Err("sequence_batching (stateful sequences) is not supported".into());
        }
        Some(SchedulingChoice::EnsembleScheduling(_)) => {
            return Err("ensemble_scheduling is not supported: serve each model on its own".into());
        }
        _ => {}
    }
    if config
        .model_transaction_policy
        .as_ref()
        .is_some_and(|p| p.decoupled)
    {
        return Err("decoupled models (several responses per request) are not supported".into());
    }
    if config.max_batch_size < 0 {
        return Err(format!(
            "max_batch_size {} is negative",
            config.max_batch_size
        ));
    }
    // A package names its own inputs and outputs (its call spec) when the config does not.
    if config.input.is_empty() && !pt2 {
        return Err("no input: list the model's inputs (name, data_type, dims)".into());
    }
    let mut names = BTreeSet::new();
    for (what, name, dtype, dims) in config
        .input
        .iter()
        .map(|i| ("input", &i.name, i.data_type, &i.dims))
        .chain(
            config
                .output
                .iter()
                .map(|o| ("output", &o.name, o.data_type, &o.dims)),
        )
    {
        if name.is_empty() {
            return Err(format!("an {what} has no name"));
        }
        if !names.insert((what, name.clone())) {
            return Err(format!(
                "{what} {:?} is listed twice",
                crate::codec::clip(name)
            ));
        }
        let shown = crate::codec::clip(name);
        let Some(dtype) = DataType::try_from(dtype).ok() else {
            return Err(format!("{what} {shown:?}: unknown data_type {dtype}"));
        };
        if kind_of(dtype).is_none() {
            return Err(format!(
                "{what} {shown:?}: data_type {} is not supported",
                dtype.as_str_name()
            ));
        }
        if dims.len() > 8 || dims.iter().any(|&d| d < -1 || d == 0) {
            return Err(format!(
                "{what} {shown:?}: dims {dims:?} must be at most 8 values, each -1 (any) or > 0"
            ));
        }
    }
    let batching = match &config.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(d)) => Some(d),
        _ => None,
    };
    let max_batch_size = config.max_batch_size as usize;
    let (max_batch, batch_timeout, preferred) = match batching {
        Some(_) if max_batch_size == 0 => {
            return Err("dynamic_batching needs max_batch_size > 0".into());
        }
        Some(d) => {
            if let Some(p) = d
                .preferred_batch_size
                .iter()
                .find(|&&p| p <= 0 || p as usize > max_batch_size)
            {
                return Err(format!(
                    "preferred_batch_size {p} is not within 1..={max_batch_size} (max_batch_size)"
                ));
            }
            (
                max_batch_size,
                Duration::from_micros(d.max_queue_delay_microseconds),
                d.preferred_batch_size.iter().map(|&p| p as usize).collect(),
            )
        }
        None => (1, Duration::ZERO, Vec::new()),
    };
    let policy = batching.and_then(|d| d.default_queue_policy.as_ref());
    let queue_capacity = policy.map(|p| p.max_queue_size as usize).filter(|&n| n > 0);
    let queue_timeout = match policy {
        Some(p) if p.default_timeout_microseconds > 0 => {
            if p.timeout_action() == TimeoutAction::Delay {
                None
            } else {
                Some(Duration::from_micros(p.default_timeout_microseconds))
            }
        }
        _ => None,
    };
    let allow_timeout_override = policy.is_some_and(|p| p.allow_timeout_override);
    let (instances, device) = instances(config)?;
    let p = &config.parameters;
    let param = |key: &str| p.get(key).map(|v| v.string_value.trim().to_string());
    let number = |key: &str| -> Result<Option<f64>, String> {
        param(key)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| {
                        format!(
                            "parameter {key}: expected a number >= 0, got {:?}",
                            crate::codec::clip(&v)
                        )
                    })
            })
            .transpose()
    };
    let flag = |key: &str| match param(key).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!(
            "parameter {key}: expected true or false, got {:?}",
            crate::codec::clip(other)
        )),
    };
    let trainable = flag(keys::TRAINABLE)?;
    let kv_sessions = flag(keys::KV_SESSIONS)?;
    let mut optimizer = OptimizerSettings::default();
    if let Some(kind) = param(keys::OPTIMIZER) {
        optimizer.kind = kind
            .parse::<OptimizerKind>()
            .map_err(|e| format!("parameter {}: {e}", keys::OPTIMIZER))?;
    }
    if let Some(m) = number(keys::MOMENTUM)? {
        optimizer.momentum = m;
    }
    if let Some(w) = number(keys::WEIGHT_DECAY)? {
        optimizer.weight_decay = w;
    }
    if let Some(e) = number(keys::ADAM_EPS)? {
        optimizer.eps = e;
    }
    if let Some(b) = param(keys::ADAM_BETAS) {
        optimizer.betas = b
            .parse::<AdamBetas>()
            .map_err(|e| format!("parameter {}: {e}", keys::ADAM_BETAS))?;
    }
    let learning_rate = number(keys::LEARNING_RATE)?;
    let (warmup_samples, warmup_warnings) = model_warmup(config)?;
    let warmup: Option<Vec<(Vec<i64>, Kind)>> = match param(keys::WARMUP_SHAPE) {
        Some(text) => {
            let shapes = text
                .split('+')
                .map(splitserve_client::args::parse_dims)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("parameter {}: {e}", keys::WARMUP_SHAPE))?;
            if shapes.len() != config.input.len() {
                return Err(format!(
                    "parameter {}: {} shape(s) for {} input(s)",
                    keys::WARMUP_SHAPE,
                    shapes.len(),
                    config.input.len()
                ));
            }
            Some(
                shapes
                    .into_iter()
                    .zip(&config.input)
                    .map(|(s, i)| (s, input_kind(i)))
                    .collect(),
            )
        }
        // The first model_warmup sample's shapes, when there is one.
        None if !warmup_samples.is_empty() => Some(
            warmup_samples[0]
                .inputs
                .iter()
                .map(|i| (i.shape.clone(), i.kind))
                .collect(),
        ),
        // The config's own dims, one row when batched, 1 for each -1.
        None => Some(
            config
                .input
                .iter()
                .map(|i| {
                    let mut shape: Vec<i64> = Vec::with_capacity(i.dims.len() + 1);
                    if config.max_batch_size > 0 {
                        shape.push(1);
                    }
                    shape.extend(i.dims.iter().map(|&d| d.max(1)));
                    (shape, input_kind(i))
                })
                .collect(),
        ),
    };
    for input in warmup.iter().flatten() {
        crate::model::check_warmup_shape(&input.0).map_err(|e| {
            format!(
                "{e} (parameter {}, or the inputs' dims)",
                keys::WARMUP_SHAPE
            )
        })?;
    }
    Ok(Settings {
        max_batch,
        batch_timeout,
        preferred_batch: preferred,
        queue_capacity,
        queue_timeout,
        allow_timeout_override,
        instances,
        device,
        trainable,
        kv_sessions,
        optimizer,
        learning_rate,
        warmup,
        warmup_samples,
        warmup_warnings,
    })
}

/// Most forwards one model_warmup sample may ask for (`count`).
pub const MAX_WARMUP_COUNT: u32 = 1000;

/// model_warmup as Triton defines it: each sample gives every input (by
/// name) its data_type, dims (without the batch dimension, which is
/// `batch_size` rows when the model batches) and zero_data, random_data or
/// input_data_file (a file in the model's `warmup/` directory). A sample that
/// asks for what splitserve cannot make (TYPE_STRING, no data) is skipped with a
/// warning; one that cannot fit the model is an error.
fn model_warmup(
    config: &ModelConfig,
) -> Result<(Vec<crate::model::WarmupSample>, Vec<String>), String> {
    use crate::model::{WarmupData, WarmupInput, WarmupSample};
    use pb::model_warmup::input::InputDataType;
    let (mut samples, mut warnings) = (Vec::new(), Vec::new());
    'samples: for (n, w) in config.model_warmup.iter().enumerate() {
        let shown = if w.name.is_empty() {
            format!("#{n}")
        } else {
            crate::codec::clip(&w.name)
        };
        let err = |m: String| format!("model_warmup sample {shown:?}: {m}");
        if let Some(name) = w
            .inputs
            .keys()
            .find(|k| !config.input.iter().any(|i| &i.name == *k))
        {
            return Err(err(format!(
                "no input is named {:?}",
                crate::codec::clip(name)
            )));
        }
        if w.count > MAX_WARMUP_COUNT {
            return Err(err(format!(
                "count {} is above {MAX_WARMUP_COUNT}",
                w.count
            )));
        }
        let rows = i64::from(w.batch_size.max(1));
        let mut inputs = Vec::with_capacity(config.input.len());
        for input in &config.input {
            let Some(wi) = w.inputs.get(&input.name) else {
                return Err(err(format!(
                    "input {:?} has no data",
                    crate::codec::clip(&input.name)
                )));
            };
            let name = crate::codec::clip(&input.name);
            let dtype = match DataType::try_from(wi.data_type) {
                Ok(DataType::TypeInvalid) => DataType::try_from(input.data_type).ok(),
                other => other.ok(),
            };
            let Some(kind) = dtype.and_then(kind_of) else {
                warnings.push(format!(
                    "model_warmup sample {shown:?}: input {name:?} has data_type {}, which                      splitserve cannot make; the sample is skipped",
                    dtype.map_or("unknown", |d| d.as_str_name())
                ));
                continue 'samples;
            };
            let data = match &wi.input_data_type {
                Some(InputDataType::ZeroData(_)) => WarmupData::Zero,
                Some(InputDataType::RandomData(_)) => WarmupData::Random,
                Some(InputDataType::InputDataFile(f)) => {
                    if f.is_empty() || f.contains('/') || f.contains("..") {
                        return Err(err(format!(
                            "input {name:?}: input_data_file {:?} must be a file name in the                              model's warmup/ directory",
                            crate::codec::clip(f)
                        )));
                    }
                    WarmupData::File(f.into())
                }
                None => {
                    warnings.push(format!(
                        "model_warmup sample {shown:?}: input {name:?} sets none of zero_data,                          random_data, input_data_file; the sample is skipped"
                    ));
                    continue 'samples;
                }
            };
            if wi.dims.iter().any(|&d| d < 1) {
                return Err(err(format!(
                    "input {name:?}: dims {:?} must all be > 0",
                    wi.dims
                )));
            }
            let mut shape = Vec::with_capacity(wi.dims.len() + 1);
            if config.max_batch_size > 0 {
                shape.push(rows);
            }
            shape.extend_from_slice(&wi.dims);
            crate::model::check_warmup_shape(&shape).map_err(&err)?;
            inputs.push(WarmupInput {
                shape,
                rows: if config.max_batch_size > 0 { rows } else { 1 },
                kind,
                data,
            });
        }
        samples.push(WarmupSample {
            name: shown.clone(),
            inputs,
            count: w.count.max(1),
        });
    }
    Ok((samples, warnings))
}

fn input_kind(i: &pb::ModelInput) -> Kind {
    DataType::try_from(i.data_type)
        .ok()
        .and_then(kind_of)
        .unwrap_or(Kind::Float)
}

/// instance_group: the sum of the counts, and the device of the first group.
fn instances(config: &ModelConfig) -> Result<(Option<usize>, Option<DeviceRequest>), String> {
    let Some(first) = config.instance_group.first() else {
        return Ok((None, None));
    };
    let mut total = 0usize;
    for g in &config.instance_group {
        if g.count < 0 {
            return Err(format!("instance_group count {} is negative", g.count));
        }
        let kind = GroupKind::try_from(g.kind).unwrap_or(GroupKind::Auto);
        if kind == GroupKind::Cpu && !g.gpus.is_empty() {
            return Err("instance_group: KIND_CPU cannot list gpus".into());
        }
        // Triton: count instances on each listed GPU; count 0 means 1.
        let per = (g.count.max(1)) as usize;
        total = total.saturating_add(per.saturating_mul(g.gpus.len().max(1)));
    }
    // One model version runs on one device here: Triton's instances spread
    // over several GPUs are refused rather than all placed on the first.
    let mut gpus: Vec<i32> = config
        .instance_group
        .iter()
        .flat_map(|g| g.gpus.iter().copied())
        .collect();
    gpus.sort_unstable();
    gpus.dedup();
    let kinds = |k: GroupKind| {
        config
            .instance_group
            .iter()
            .any(|g| GroupKind::try_from(g.kind).unwrap_or(GroupKind::Auto) == k)
    };
    if gpus.len() > 1 || (kinds(GroupKind::Cpu) && (kinds(GroupKind::Gpu) || !gpus.is_empty())) {
        return Err(format!(
            "instance_group places instances on several devices (gpus {gpus:?}{}): a model \
             version runs on one device here; list one GPU, or serve one replica per GPU",
            if kinds(GroupKind::Cpu) {
                " and the CPU"
            } else {
                ""
            }
        ));
    }
    let device = match GroupKind::try_from(first.kind).unwrap_or(GroupKind::Auto) {
        GroupKind::Cpu => Some(DeviceRequest::Cpu),
        GroupKind::Gpu => Some(DeviceRequest::Cuda(
            first.gpus.first().map_or(0, |&g| g.max(0) as usize),
        )),
        GroupKind::Auto | GroupKind::Model => first
            .gpus
            .first()
            .map(|&g| DeviceRequest::Cuda(g.max(0) as usize)),
    };
    Ok((Some(total), device))
}

/// The libtorch dtype of a config data type (None: not supported here).
pub fn kind_of(d: DataType) -> Option<Kind> {
    Some(match d {
        DataType::TypeBool => Kind::Bool,
        DataType::TypeUint8 => Kind::Uint8,
        DataType::TypeInt8 => Kind::Int8,
        DataType::TypeInt16 => Kind::Int16,
        DataType::TypeInt32 => Kind::Int,
        DataType::TypeInt64 => Kind::Int64,
        DataType::TypeFp16 => Kind::Half,
        DataType::TypeBf16 => Kind::BFloat16,
        DataType::TypeFp32 => Kind::Float,
        DataType::TypeFp64 => Kind::Double,
        DataType::TypeInvalid
        | DataType::TypeUint16
        | DataType::TypeUint32
        | DataType::TypeUint64
        | DataType::TypeString => return None,
    })
}

/// The Open Inference Protocol's name of a config data type ("FP32").
pub fn datatype_name(d: i32) -> &'static str {
    DataType::try_from(d)
        .ok()
        .and_then(|d| d.as_str_name().strip_prefix("TYPE_"))
        .unwrap_or("INVALID")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MLP: &str = r#"
name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 500
  preferred_batch_size: [ 4, 8 ]
  default_queue_policy { max_queue_size: 16 default_timeout_microseconds: 2000000 }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 2 } }
parameters: { key: "splitserve.warmup_shape" value: { string_value: "2x8" } }
"#;

    #[test]
    fn a_triton_config_parses_and_applies_what_it_sets() {
        let mut p = parse(MLP).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let s = check(&mut p.config, "mlp").unwrap();
        assert_eq!(s.max_batch, 8);
        assert_eq!(s.batch_timeout, Duration::from_micros(500));
        assert_eq!(s.preferred_batch, vec![4, 8]);
        assert_eq!(s.queue_capacity, Some(16));
        assert_eq!(s.queue_timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.instances, Some(2));
        assert_eq!(s.device, Some(DeviceRequest::Cpu));
        assert_eq!(s.warmup, Some(vec![(vec![2, 8], Kind::Float)]));
        assert_eq!(p.config.backend, BACKEND);
    }

    #[test]
    fn unsupported_fields_are_named_in_warnings() {
        let text = format!(
            "{MLP}\noptimization {{ input_pinned_memory {{ enable: true }} }}\n\
             response_cache {{ enable: true }}\n\
             parameters: {{ key: \"INFERENCE_MODE\" value: {{ string_value: \"true\" }} }}"
        );
        let p = parse(&text).unwrap();
        let all = p.warnings.join("\n");
        assert!(
            all.contains("`optimization.input_pinned_memory.enable`"),
            "{all}"
        );
        assert!(all.contains("`response_cache.enable`"), "{all}");
        assert!(all.contains("\"INFERENCE_MODE\""), "{all}");
        assert_eq!(p.warnings.len(), 3, "{all}");
    }

    #[test]
    fn configs_that_cannot_work_fail_with_the_reason() {
        let fails = |text: &str, why: &str| {
            let err = parse(text)
                .and_then(|mut p| check(&mut p.config, "m").map(|_| ()))
                .unwrap_err();
            assert!(err.contains(why), "{err:?} lacks {why:?}");
        };
        let io = r#"input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]"#;
        fails(
            "max_batch_size: 4 nonsense: 1",
            "line 1, column 19: an unknown field for message 'inference.ModelConfig'",
        );
        fails(
            &format!("platform: \"onnxruntime_onnx\" {io}"),
            "onnxruntime_onnx",
        );
        fails(
            &format!("name: \"other\" {io}"),
            "differs from its directory",
        );
        fails(
            &format!("sequence_batching {{ }} {io}"),
            "sequence_batching",
        );
        fails(
            &format!("dynamic_batching {{ }} {io}"),
            "max_batch_size > 0",
        );
        fails("max_batch_size: 4", "no input");
        fails(
            r#"input [ { name: "s" data_type: TYPE_STRING dims: [ 1 ] } ]"#,
            "TYPE_STRING",
        );
        fails(
            r#"input [ { name: "x" data_type: TYPE_FP32 dims: [ 0 ] } ]"#,
            "dims",
        );
        fails(
            &format!(
                "{io} parameters: {{ key: \"splitserve.trainable\" value: {{ string_value: \"yes\" }} }}"
            ),
            "true or false",
        );
        fails(
            &format!("{io} instance_group [ {{ kind: KIND_CPU gpus: [ 0 ] }} ]"),
            "KIND_CPU",
        );
        fails(
            &format!("{io} instance_group [ {{ kind: KIND_GPU gpus: [ 0, 1 ] }} ]"),
            "several devices (gpus [0, 1])",
        );
        fails(
            &format!(
                "{io} instance_group [ {{ kind: KIND_GPU gpus: [ 1 ] }}, {{ kind: KIND_CPU }} ]"
            ),
            "several devices (gpus [1] and the CPU)",
        );
    }

    #[test]
    fn lists_without_a_colon_parse_and_strings_and_comments_are_left_alone() {
        let fixed = |t: &str| colon_before_lists(t).0;
        assert_eq!(
            fixed("input [ { name: \"a [b\" } ] # x [\nkind: KIND_CPU"),
            "input :[ { name: \"a [b\" } ] # x [\nkind: KIND_CPU"
        );
        assert_eq!(fixed("dims: [ 8 ]"), "dims: [ 8 ]");
        assert_eq!(fixed("dims:[8] gpus [0]"), "dims:[8] gpus :[0]");
        assert_eq!(colon_before_lists("dims:[8] gpus [0]").1, vec![14]);
    }

    #[test]
    fn parse_errors_name_the_place_and_never_the_text() {
        let err = |text: &str| parse(text).unwrap_err();
        // A file that is not a config at all (a symlink to a token file, say):
        // its first token is the secret.
        let e = err("s3cr3t-0123456789abcdef infer,train\n");
        assert!(e.contains("line 1, column 7"), "{e}");
        assert!(!e.contains("s3cr3t") && !e.contains("infer"), "{e}");
        let e = err("max_batch_size: 4\n\ninput [ { nme: \"secret\" } ]\n");
        assert_eq!(
            e,
            "config.pbtxt is not a valid ModelConfig: line 3, column 11: an unknown field for \
             message 'inference.ModelInput'"
        );
        let e = err("input [ { data_type: TYPE_SECRET } ]");
        assert!(e.contains("line 1, column 22") && e.contains("enum"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
        let e = err("max_batch_size: \"secret\"");
        assert!(
            e.contains("line 1, column 17") && !e.contains("secret"),
            "{e}"
        );
        let e = err("max_batch_size: 99999999999999");
        assert!(e.contains("out of range") && !e.contains("99999"), "{e}");
        let e = err("name: \"a\" name: \"b\"");
        assert!(e.contains("line 1, column 17: a field set twice"), "{e}");
        let e = err("max_batch_size: [\n");
        assert!(
            e.contains("line 1, column 17: expected an integer here"),
            "{e}"
        );
        let e = err("input [ { name: \"x\"");
        assert!(e.contains("end of input"), "{e}");
        // Not UTF-8: the place, from the reader.
        assert_eq!(line_column(b"ab\ncd\xff", 5), (2, 3));
    }

    #[test]
    fn warm_up_inputs_are_bounded_before_anything_is_allocated() {
        let fails = |text: &str| {
            parse(text)
                .and_then(|mut p| check(&mut p.config, "m").map(|_| ()))
                .unwrap_err()
        };
        let e = fails(
            r#"input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
parameters: { key: "splitserve.warmup_shape" value: { string_value: "1000000x1000000" } }"#,
        );
        assert!(e.contains("at most 268435456 elements"), "{e}");
        let e = fails(
            r#"max_batch_size: 1 input [ { name: "x" data_type: TYPE_FP32 dims: [ 1000000, 1000000 ] } ]"#,
        );
        assert!(e.contains("at most 268435456 elements"), "{e}");
    }

    #[test]
    fn without_dynamic_batching_requests_are_not_joined() {
        let mut p = parse(
            r#"max_batch_size: 8 input [ { name: "x" data_type: TYPE_INT64 dims: [ -1 ] } ]"#,
        )
        .unwrap();
        let s = check(&mut p.config, "m").unwrap();
        assert_eq!((s.max_batch, s.instances, s.device), (1, None, None));
        assert_eq!(s.warmup, Some(vec![(vec![1, 1], Kind::Int64)]));
    }

    #[test]
    fn model_warmup_samples_are_read_as_triton_defines_them() {
        let base = r#"
max_batch_size: 4
input [ { name: "a" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "b" data_type: TYPE_INT64 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"#;
        let with = |warmup: &str| -> Result<Settings, String> {
            let mut p = parse(&format!("{base}model_warmup [ {warmup} ]")).unwrap();
            assert!(p.warnings.is_empty(), "{:?}", p.warnings);
            check(&mut p.config, "m")
        };
        let s = with(
            r#"{ name: "w" batch_size: 2 count: 3
                 inputs { key: "b" value: { data_type: TYPE_INT64 dims: [ 2 ] random_data: true } }
                 inputs { key: "a" value: { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "a.bin" } } },
               { name: "s"
                 inputs { key: "a" value: { data_type: TYPE_STRING dims: [ 3 ] zero_data: true } }
                 inputs { key: "b" value: { data_type: TYPE_INT64 dims: [ 2 ] zero_data: true } } }"#,
        )
        .unwrap();
        let [w] = s.warmup_samples.as_slice() else {
            panic!("{:?}", s.warmup_samples)
        };
        // In the config's input order, the batch first.
        assert_eq!((w.name.as_str(), w.count), ("w", 3));
        assert_eq!(w.inputs[0].shape, [2, 3]);
        assert_eq!(
            w.inputs[0].data,
            crate::model::WarmupData::File("a.bin".into())
        );
        assert_eq!(
            (w.inputs[1].kind, &w.inputs[1].data),
            (Kind::Int64, &crate::model::WarmupData::Random)
        );
        assert_eq!(
            s.warmup,
            Some(vec![(vec![2, 3], Kind::Float), (vec![2, 2], Kind::Int64)])
        );
        assert!(
            s.warmup_warnings.len() == 1
                && s.warmup_warnings[0].contains("\"s\"")
                && s.warmup_warnings[0].contains("TYPE_STRING"),
            "{:?}",
            s.warmup_warnings
        );
        for (bad, says) in [
            (
                r#"{ name: "x" inputs { key: "a" value: { dims: [ 3 ] zero_data: true } } }"#,
                "input \"b\" has no data",
            ),
            (
                r#"{ name: "x" inputs { key: "c" value: { dims: [ 3 ] zero_data: true } } }"#,
                "no input is named \"c\"",
            ),
            (r#"{ name: "x" count: 5000 }"#, "count 5000 is above 1000"),
            (
                r#"{ name: "x" inputs { key: "a" value: { dims: [ 3 ] input_data_file: "../etc/passwd" } }
                   inputs { key: "b" value: { dims: [ 2 ] zero_data: true } } }"#,
                "must be a file name",
            ),
            (
                r#"{ name: "x" inputs { key: "a" value: { dims: [ 1000000, 1000000 ] zero_data: true } }
                   inputs { key: "b" value: { dims: [ 2 ] zero_data: true } } }"#,
                "at most 268435456 elements",
            ),
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                e.contains(says) && e.contains("model_warmup sample \"x\""),
                "{e}"
            );
        }
    }
}
