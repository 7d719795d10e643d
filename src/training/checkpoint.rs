//! Durable, exact checkpoints: a model's parameters, its optimizer state
//! (momentum buffers, Adam moments and step counts) and the gradients still
//! pending accumulation, so that a restarted server continues exactly where
//! the last checkpoint left off.
//!
//! Layout under `--checkpoint-dir`:
//! - `NAME.ckpt/step-0000000042/` one complete checkpoint: `model.pt` or
//!   `model.safetensors`, `optimizer.safetensors`, `state.json`;
//! - `NAME.pt` / `NAME.safetensors`: the newest parameters (a hard link into
//!   the newest checkpoint), what `--model` serves again;
//! - for a LoRA trunk (splitserve-export `--lora`): `step-N/adapter/` in each
//!   checkpoint and `NAME.adapter/` for the newest, a peft adapter directory
//!   (`adapter_model.safetensors` under peft's key names, `adapter_config.json`
//!   as the exporter's peft wrote it) that `PeftModel.from_pretrained` loads.
//!
//! A checkpoint is written into `NAME.ckpt/.tmp-...`, every file and the
//! directory fsynced, then renamed into place and the parent fsynced: a crash
//! leaves either the whole checkpoint or a temporary directory that the next
//! start removes. `--checkpoint-keep` bounds how many are retained.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::ModelState;
use crate::model::Model;

/// Bumped when the layout changes; older ones are refused, not misread.
const FORMAT: u32 = 1;

/// What `state.json` records next to the tensors.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    model: String,
    /// Optimizer steps taken.
    steps: u64,
    /// Training backwards accumulated since the last step.
    pending: u32,
    /// The parameters the optimizer updates, in order.
    params: usize,
    /// Adam's step count per parameter (None: no Adam state).
    adam_steps: Vec<Option<u64>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

fn sync_file(path: &Path) -> Result<(), String> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("cannot fsync", path, e))
}

/// A directory's entries are durable only once the directory is fsynced.
fn sync_dir(path: &Path) -> Result<(), String> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("cannot fsync directory", path, e))
}

fn root(dir: &Path, model: &str) -> PathBuf {
    dir.join(format!("{model}.ckpt"))
}

fn cpu(t: &Tensor) -> Tensor {
    t.detach().to_device(Device::Cpu).contiguous()
}

/// Writes one checkpoint of `model` at `state.steps` and keeps the newest
/// `keep`. Returns the newest-parameters file, or None for a model without
/// parameters.
pub(super) fn write(
    dir: &Path,
    model: &Model,
    state: &ModelState,
    keep: usize,
) -> Result<Option<PathBuf>, String> {
    let Some(file_name) = model.parameters_file_name() else {
        return Ok(None);
    };
    let root = root(dir, &model.name);
    fs::create_dir_all(&root).map_err(|e| io("cannot create", &root, e))?;
    let name = format!("step-{:010}", state.steps);
    let tmp = root.join(format!(".tmp-{name}"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| io("cannot create", &tmp, e))?;

    let params_file = tmp.join(file_name);
    model
        .write_parameters(&params_file)
        .map_err(|e| e.to_string())?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, b) in state.momentum.iter().enumerate() {
        if let Some(b) = b {
            tensors.push((format!("momentum.{i}"), cpu(b)));
        }
    }
    for (i, a) in state.adam.iter().enumerate() {
        if let Some((m, v, _)) = a {
            tensors.push((format!("adam_m.{i}"), cpu(m)));
            tensors.push((format!("adam_v.{i}"), cpu(v)));
        }
    }
    if state.pending > 0 {
        for (i, p) in state.params.iter().flatten().enumerate() {
            let g = p.grad();
            if g.defined() {
                tensors.push((format!("grad.{i}"), cpu(&g)));
            }
        }
    }
    let optimizer_file = tmp.join("optimizer.safetensors");
    let mut files = vec![params_file.clone()];
    let adapter = model.peft_adapter().map_err(|e| e.to_string())?;
    let has_adapter = adapter.is_some();
    if let Some((config, params)) = adapter {
        files.extend(write_adapter(&tmp.join(ADAPTER), &config, &params)?);
    }
    if !tensors.is_empty() {
        Tensor::write_safetensors(&tensors, &optimizer_file)
            .map_err(|e| format!("cannot write {}: {e}", optimizer_file.display()))?;
        files.push(optimizer_file);
    }
    let state_file = tmp.join("state.json");
    let record = StateFile {
        format: FORMAT,
        model: model.name.clone(),
        steps: state.steps,
        pending: state.pending,
        params: state.params.as_ref().map_or(0, Vec::len),
        adam_steps: state.adam.iter().map(|a| a.as_ref().map(|s| s.2)).collect(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    fs::write(&state_file, json).map_err(|e| io("cannot write", &state_file, e))?;
    files.push(state_file);
    for f in &files {
        sync_file(f)?;
    }
    sync_dir(&tmp)?;

    let done = root.join(&name);
    if done.exists() {
        // The same step saved again (at shutdown): the new one replaces it.
        fs::remove_dir_all(&done).map_err(|e| io("cannot replace", &done, e))?;
    }
    fs::rename(&tmp, &done).map_err(|e| io("cannot rename into", &done, e))?;
    sync_dir(&root)?;

    // The newest parameters under a stable name, for `--model` and tools.
    let ext = Path::new(file_name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("pt");
    let latest = dir.join(format!("{}.{ext}", model.name));
    let link = dir.join(format!(".{}.{ext}.tmp", model.name));
    let _ = fs::remove_file(&link);
    if fs::hard_link(done.join(file_name), &link).is_err() {
        fs::copy(done.join(file_name), &link).map_err(|e| io("cannot copy to", &link, e))?;
        sync_file(&link)?;
    }
    fs::rename(&link, &latest).map_err(|e| io("cannot rename into", &latest, e))?;
    if has_adapter {
        publish_adapter(dir, &model.name, &done.join(ADAPTER))?;
    }
    sync_dir(dir)?;

    prune(&root, keep);
    Ok(Some(latest))
}

/// A checkpoint's peft adapter directory, inside `step-N/`.
const ADAPTER: &str = "adapter";

/// peft's key for a trunk's LoRA parameter: the trunk keeps peft's module
/// path minus its `base_model.model.` wrapper, with the adapter name
/// (`q_proj.lora_A.default.weight`); `PeftModel.save_pretrained` writes the
/// wrapper and drops the adapter name (`base_model.model.` +
/// `q_proj.lora_A.weight`). None for a parameter that is no adapter's.
fn peft_key(name: &str) -> Option<String> {
    ["lora_A", "lora_B"].into_iter().find_map(|part| {
        let marker = format!(".{part}.default.");
        let at = name.find(&marker)?;
        Some(format!(
            "base_model.model.{}.{part}.{}",
            &name[..at],
            &name[at + marker.len()..]
        ))
    })
}

/// Writes a peft adapter directory: the LoRA parameters under peft's names and
/// the adapter_config.json the model carries. Returns the files written.
fn write_adapter(
    dir: &Path,
    config: &str,
    params: &[(String, Tensor)],
) -> Result<Vec<PathBuf>, String> {
    match serde_json::from_str::<serde_json::Value>(config) {
        Ok(serde_json::Value::Object(_)) => {}
        _ => return Err("the model's peft adapter config is not a JSON object".into()),
    }
    let mut tensors = Vec::new();
    for (name, t) in params {
        if !name.contains(".lora_") {
            continue;
        }
        let key = peft_key(name)
            .ok_or_else(|| format!("cannot name the adapter parameter {name:?} as peft does"))?;
        tensors.push((key, cpu(t)));
    }
    if tensors.is_empty() {
        return Err("the model carries a peft adapter config but no LoRA parameters".into());
    }
    fs::create_dir(dir).map_err(|e| io("cannot create", dir, e))?;
    let weights = dir.join("adapter_model.safetensors");
    Tensor::write_safetensors(&tensors, &weights)
        .map_err(|e| format!("cannot write {}: {e}", weights.display()))?;
    let config_file = dir.join("adapter_config.json");
    fs::write(&config_file, config).map_err(|e| io("cannot write", &config_file, e))?;
    sync_dir(dir)?;
    Ok(vec![weights, config_file])
}

/// `NAME.adapter`: the newest checkpoint's adapter under a stable name, swapped
/// in whole (a crash between the two renames leaves `.NAME.adapter.old`, which
/// the next start puts back).
fn publish_adapter(dir: &Path, model: &str, from: &Path) -> Result<(), String> {
    let latest = dir.join(format!("{model}.adapter"));
    let tmp = dir.join(format!(".{model}.adapter.tmp"));
    let old = dir.join(format!(".{model}.adapter.old"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        if fs::hard_link(from.join(file), tmp.join(file)).is_err() {
            fs::copy(from.join(file), tmp.join(file))
                .map_err(|e| io("cannot copy to", &tmp.join(file), e))?;
            sync_file(&tmp.join(file))?;
        }
    }
    sync_dir(&tmp)?;
    let _ = fs::remove_dir_all(&old);
    if latest.exists() {
        fs::rename(&latest, &old).map_err(|e| io("cannot rename", &latest, e))?;
    }
    fs::rename(&tmp, &latest).map_err(|e| io("cannot rename into", &latest, e))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

/// Sorts `step-N` directories by N, newest first: by number, not by name,
/// so that a step count past the 10 padded digits still sorts right.
fn newest_first(found: &mut [PathBuf]) {
    let step = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok())
    };
    found.sort_by(|a, b| (step(b), b).cmp(&(step(a), a)));
}

/// Complete checkpoints of a model (with their `state.json`), newest first.
fn complete(dir: &Path, model: &str) -> Vec<PathBuf> {
    candidates(dir, model)
        .into_iter()
        .filter(|p| p.join("state.json").is_file())
        .collect()
}

fn prune(root: &Path, keep: usize) {
    let Some(dir) = root.parent() else { return };
    let Some(model) = root
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".ckpt"))
    else {
        return;
    };
    for old in complete(dir, model).into_iter().skip(keep.max(1)) {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot remove an old checkpoint");
        }
    }
}

/// Removes what a crash mid-write left behind: temporary checkpoint
/// directories and half-linked parameter files.
pub(super) fn clean_stale(dir: &Path, model: &str) {
    let mut stale = Vec::new();
    if let Ok(entries) = fs::read_dir(root(dir, model)) {
        stale.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(".tmp-"))
                }),
        );
    }
    for ext in ["pt", "safetensors"] {
        let link = dir.join(format!(".{model}.{ext}.tmp"));
        if link.exists() {
            stale.push(link);
        }
        // Left by versions that wrote NAME.tmp.pt.
        let old = dir.join(format!("{model}.tmp.{ext}"));
        if old.exists() {
            stale.push(old);
        }
    }
    // An adapter swap cut between its two renames: the previous one goes back.
    let latest = dir.join(format!("{model}.adapter"));
    let old = dir.join(format!(".{model}.adapter.old"));
    if old.is_dir() && !latest.exists() && fs::rename(&old, &latest).is_ok() {
        tracing::info!(path = %latest.display(), "restored the adapter a crash left mid-swap");
    }
    for leftover in [old, dir.join(format!(".{model}.adapter.tmp"))] {
        if leftover.exists() {
            stale.push(leftover);
        }
    }
    for path in stale {
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a checkpoint left incomplete by a crash")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an incomplete checkpoint")
            }
        }
    }
}

/// Every checkpoint directory of a model, newest first, complete or not: a
/// `step-*` directory is only ever renamed into place whole, so one without its
/// `state.json` is damaged, not half written.
fn candidates(dir: &Path, model: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root(dir, model)) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    newest_first(&mut found);
    found
}

/// The first line of an error, cut, for the one-sentence refusal.
fn first_line(e: &str) -> String {
    let line = e.lines().next().unwrap_or_default();
    match line.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_string(),
    }
}

/// Renames a checkpoint that does not load to `unloadable-step-*` beside it:
/// kept for a look, no longer resumed from, counted or pruned.
fn set_aside(path: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let aside = path.with_file_name(format!("unloadable-{name}"));
    match fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(
            checkpoint = %path.display(),
            moved_to = %aside.display(),
            "a checkpoint that does not load was set aside"
        ),
        Err(e) => tracing::warn!(
            checkpoint = %path.display(),
            error = %e,
            "cannot set aside a checkpoint that does not load"
        ),
    }
}

/// Restores the newest checkpoint that loads, into `model` and a fresh
/// optimizer state; the newer ones that do not load are set aside. None when
/// there is none. When checkpoints exist and none loads, an error naming the
/// directory, unless `start_fresh`: then the model keeps its own weights and
/// they are all set aside.
pub(super) fn restore(
    dir: &Path,
    model: &mut Model,
    start_fresh: bool,
) -> Result<Option<(ModelState, PathBuf)>, String> {
    let found = candidates(dir, &model.name);
    let Some(newest) = found.first() else {
        return Ok(None);
    };
    // A failed attempt may have replaced some weights: with --checkpoint-start-fresh
    // the model's own come back if none loads.
    let own = if start_fresh {
        Some(
            model
                .all_parameters()
                .and_then(|ps| {
                    ps.iter()
                        .map(|p| p.f_to_device(Device::Cpu).and_then(|c| c.f_detach_copy()))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| crate::model::internal(model, e))
                })
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let mut newest_error = None;
    for (i, candidate) in found.iter().enumerate() {
        match restore_one(candidate, model) {
            Ok(state) => {
                found[..i].iter().for_each(|p| set_aside(p));
                return Ok(Some((state, candidate.clone())));
            }
            Err(e) => {
                tracing::warn!(
                    model = %model.name,
                    checkpoint = %candidate.display(),
                    error = %e,
                    "checkpoint does not load; trying an older one"
                );
                newest_error.get_or_insert(e);
            }
        }
    }
    let why = first_line(&newest_error.unwrap_or_default());
    let Some(own) = own else {
        return Err(format!(
            "model {:?} has {} checkpoint(s) in {} and none of them loads (the newest, {}: {why}); \
             repair or move them away, or start with --checkpoint-start-fresh to train from the \
             model's own weights",
            model.name,
            found.len(),
            root(dir, &model.name).display(),
            newest
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default(),
        ));
    };
    let params = model.all_parameters().map_err(|e| e.to_string())?;
    tch::no_grad(|| -> Result<(), tch::TchError> {
        for (mut p, saved) in params.into_iter().zip(&own) {
            p.f_copy_(saved)?;
        }
        Ok(())
    })
    .map_err(|e| format!("cannot restore the model's own weights: {e}"))?;
    tracing::warn!(
        model = %model.name,
        checkpoints = found.len(),
        dir = %root(dir, &model.name).display(),
        "no checkpoint loads; starting from the model's own weights (--checkpoint-start-fresh)"
    );
    found.iter().for_each(|p| set_aside(p));
    Ok(None)
}

/// True when every element of `t` is finite.
fn finite(t: &Tensor) -> Result<bool, String> {
    super::all_finite(t).map_err(|e| e.to_string())
}

fn restore_one(path: &Path, model: &mut Model) -> Result<ModelState, String> {
    let state_file = path.join("state.json");
    let record: StateFile = serde_json::from_slice(
        &fs::read(&state_file).map_err(|e| io("cannot read", &state_file, e))?,
    )
    .map_err(|e| format!("{}: {e}", state_file.display()))?;
    if record.format != FORMAT {
        return Err(format!(
            "checkpoint format {} is not {FORMAT}",
            record.format
        ));
    }
    let file_name = model
        .parameters_file_name()
        .ok_or("the model has no parameters")?;
    model
        .load_parameters(&path.join(file_name))
        .map_err(|e| e.to_string())?;
    let params = model.trainable_parameters().map_err(|e| e.to_string())?;
    if params.len() != record.params && record.params != 0 {
        return Err(format!(
            "the checkpoint has {} trainable parameters, the model {}",
            record.params,
            params.len()
        ));
    }
    let optimizer_file = path.join("optimizer.safetensors");
    let tensors: HashMap<String, Tensor> = if optimizer_file.is_file() {
        Tensor::read_safetensors(&optimizer_file)
            .map_err(|e| format!("optimizer.safetensors: {e}"))?
            .into_iter()
            .collect()
    } else {
        HashMap::new()
    };
    // A checkpoint is refused, as corrupt, unless everything it restores is
    // finite and shaped like the parameter it belongs to: a NaN weight would
    // be served, and a NaN, negative or misshapen Adam moment would refuse or
    // fail every later step.
    for p in model.all_parameters().map_err(|e| e.to_string())? {
        if p.is_floating_point() && !finite(&p)? {
            return Err(format!("{file_name} holds NaN or infinite weights"));
        }
    }
    for (key, t) in &tensors {
        let Some(i) = key
            .rsplit_once('.')
            .and_then(|(_, i)| i.parse::<usize>().ok())
        else {
            return Err(format!("optimizer.safetensors: unexpected tensor {key:?}"));
        };
        let Some(p) = params.get(i) else {
            return Err(format!("optimizer.safetensors: {key:?} names no parameter"));
        };
        if t.size() != p.size() || t.kind() != p.kind() {
            return Err(format!(
                "optimizer.safetensors: {key:?} is {:?} {:?}, its parameter {:?} {:?}",
                t.kind(),
                t.size(),
                p.kind(),
                p.size()
            ));
        }
        if !finite(t)? {
            return Err(format!(
                "optimizer.safetensors: {key:?} holds NaN or infinite values"
            ));
        }
        if key.starts_with("adam_v.")
            && t.f_lt(0.0)
                .and_then(|n| n.f_any())
                .map_err(|e| e.to_string())?
                .int64_value(&[])
                != 0
        {
            return Err(format!(
                "optimizer.safetensors: {key:?} holds negative values"
            ));
        }
    }
    let device = model.device;
    let take = |key: String| tensors.get(&key).map(|t| t.to_device(device));
    let momentum = (0..params.len())
        .map(|i| take(format!("momentum.{i}")))
        .collect();
    let adam = (0..params.len())
        .map(|i| {
            let t = record.adam_steps.get(i).copied().flatten()?;
            Some((
                take(format!("adam_m.{i}"))?,
                take(format!("adam_v.{i}"))?,
                t,
            ))
        })
        .collect();
    if record.pending > 0 {
        // Gradients pending accumulation go back where backward put them: the
        // gradient of sum(p * g) with respect to p is g.
        tch::with_grad(|| -> Result<(), tch::TchError> {
            for (i, p) in params.iter().enumerate() {
                if let Some(g) = take(format!("grad.{i}")) {
                    p.f_mul(&g)?.f_sum(None::<tch::Kind>)?.f_backward()?;
                }
            }
            Ok(())
        })
        .map_err(|e| format!("pending gradients: {e}"))?;
    }
    Ok(ModelState {
        params: Some(params),
        momentum,
        adam,
        pending: record.pending,
        steps: record.steps,
        saved_at: record.steps,
        probe_finite: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_parameters_get_peft_key_names() {
        assert_eq!(
            peft_key("model.layers.1.self_attn.q_proj.lora_A.default.weight").as_deref(),
            Some("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        );
        assert_eq!(
            peft_key("transformer.h.2.attn.c_attn.lora_B.default.weight").as_deref(),
            Some("base_model.model.transformer.h.2.attn.c_attn.lora_B.weight")
        );
        assert_eq!(
            peft_key("model.layers.1.self_attn.q_proj.base_layer.weight"),
            None
        );
    }

    #[test]
    fn checkpoints_sort_by_step_number_past_ten_digits() {
        let mut found: Vec<PathBuf> = ["step-0000000009", "step-10000000000", "step-9999999999"]
            .iter()
            .map(PathBuf::from)
            .collect();
        newest_first(&mut found);
        assert_eq!(
            found,
            ["step-10000000000", "step-9999999999", "step-0000000009"].map(PathBuf::from)
        );
    }

    #[test]
    fn pruning_keeps_the_newest_complete_checkpoints_and_at_least_one() {
        let dir = std::env::temp_dir().join(format!("splitserve-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = root(&dir, "m");
        for step in [1u64, 2, 3, 4, 5] {
            let d = root.join(format!("step-{step:010}"));
            fs::create_dir_all(&d).unwrap();
            // Step 5 is damaged (no state.json): never counted as one of those kept.
            if step != 5 {
                fs::write(d.join("state.json"), "{}").unwrap();
            }
        }
        let left = |root: &Path| {
            let mut names: Vec<String> = fs::read_dir(root)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        prune(&root, 2);
        assert_eq!(
            left(&root),
            ["step-0000000003", "step-0000000004", "step-0000000005"]
        );
        prune(&root, 0);
        assert_eq!(left(&root), ["step-0000000004", "step-0000000005"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
