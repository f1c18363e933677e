//! Checkpoint folders: everything needed to resume a run exactly, laid out as the Trainer lays
//! out `output_dir/checkpoint-{global_step}/`.
//!
//! A folder holds the model as `save_pretrained` writes it, `optimizer.safetensors` (both AdamW
//! moments per parameter, the step count in the metadata), `scheduler.json`, `rng_state.json`
//! (where the data order and dropout streams stand), `trainer_state.json`, `training_args.json`
//! and, in `--fp16` runs, `scaler.json` (the loss scale). The PyTorch pickles transformers writes
//! instead (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `training_args.bin`, `scaler.pt`)
//! are replaced by these portable files.
//!
//! A checkpoint is written whole under `checkpoint-N.tmp-<pid>` and renamed into place, so a
//! crash never leaves a half-written folder under a name [`latest_checkpoint`] would pick.
//! Deletion by [`rotate_checkpoints`] renames before removing, for the same reason.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Result};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::Backend;
use crate::config::BertConfig;
use crate::model::params::ParamLayout;
use crate::model::weights::{copy_tensor, map_file, save_pretrained, write_atomic};
use crate::model::Classifier;
use crate::train::loss_scale::LossScaler;
use crate::train::optimizer::AdamW;
use crate::train::schedule::{Schedule, ScheduleKind};
use crate::train::state::{read_json, write_json, TrainerState};

/// transformers' `PREFIX_CHECKPOINT_DIR`.
pub const CHECKPOINT_PREFIX: &str = "checkpoint";
pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const SCHEDULER_FILE: &str = "scheduler.json";
pub const RNG_STATE_FILE: &str = "rng_state.json";
/// The fp16 loss scaler (accelerate's `scaler.pt`); only in `--fp16` runs.
pub const SCALER_FILE: &str = "scaler.json";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const TRAINING_ARGS_FILE: &str = "training_args.json";

/// Where a run stands in its data and random streams: with these, a resumed run draws the same
/// batches in the same order and the same dropout masks as the run that never stopped.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPosition {
    /// `--seed`: model initialization and dropout.
    pub seed: u64,
    /// `--data_seed` (the seed when not given): the sampler's shuffles.
    pub data_seed: u64,
    /// The epoch in progress, 0-based.
    pub epoch: u64,
    /// Optimizer steps done in that epoch (the batches to skip on resume).
    pub step_in_epoch: u64,
    /// Micro-batches done over the whole run; dropout streams are keyed by it.
    pub micro_step: u64,
}

/// What a checkpoint is made of, borrowed from the running trainer.
pub struct CheckpointContents<'a, B: Backend> {
    pub model: &'a Classifier<B>,
    pub optimizer: &'a AdamW<B>,
    pub schedule: &'a Schedule,
    pub position: &'a RunPosition,
    /// The fp16 loss scaler, when the run has one.
    pub loss_scaler: Option<&'a LossScaler>,
    /// Its `global_step` names the folder.
    pub state: &'a TrainerState,
    /// The run's arguments, saved as `training_args.json`.
    pub args: &'a Value,
    /// Where the tokenizer files to copy along with the model are (a saved checkpoint should be
    /// usable on its own by `from_pretrained`).
    pub tokenizer_dir: Option<&'a Path>,
}

/// A checkpoint read back: host copies of everything, ready to upload.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedCheckpoint {
    /// In [`ParamLayout`] order.
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// AdamW steps taken (bias correction continues from here).
    pub adam_step: u64,
    pub schedule: Schedule,
    /// The scheduler's `last_epoch`: optimizer steps it has seen.
    pub schedule_last_step: u64,
    pub position: RunPosition,
    /// From `scaler.json`, when the run that saved it had one (`--fp16`).
    pub loss_scaler: Option<LossScaler>,
    pub state: TrainerState,
    pub args: Value,
}

/// `scheduler.json`: the schedule and how far along it the run is.
#[derive(Serialize, Deserialize)]
struct SchedulerFile {
    kind: String,
    base_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
    last_step: u64,
}

/// transformers' `lr_scheduler_type` spelling, which `ScheduleKind::from_str` reads back.
fn kind_name(kind: ScheduleKind) -> &'static str {
    match kind {
        ScheduleKind::Linear => "linear",
        ScheduleKind::Cosine => "cosine",
        ScheduleKind::Constant => "constant",
        ScheduleKind::ConstantWithWarmup => "constant_with_warmup",
    }
}

/// `output_dir/checkpoint-{step}`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}-{step}"))
}

/// The step of a folder named exactly `checkpoint-<digits>` (transformers' `_re_checkpoint`),
/// so `checkpoint-12.tmp-123` and other leftovers are never taken for a checkpoint.
fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CHECKPOINT_PREFIX)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes `output_dir/checkpoint-{state.global_step}` and returns its path. A checkpoint already
/// there is replaced only once the new one is complete.
pub fn save_checkpoint<B: Backend>(
    backend: &B,
    output_dir: &Path,
    c: &CheckpointContents<B>,
) -> Result<PathBuf> {
    let layout = &c.model.layout;
    // Everything leaves the device before the disk is touched: a device error leaves
    // output_dir as it was.
    let params = backend.download(&c.model.params)?;
    let exp_avg = backend.download(&c.optimizer.exp_avg)?;
    let exp_avg_sq = backend.download(&c.optimizer.exp_avg_sq)?;
    ensure!(
        exp_avg.len() == layout.total && exp_avg_sq.len() == layout.total,
        "the optimizer holds {} moment values for a model of {} parameters",
        exp_avg.len(),
        layout.total
    );

    fs::create_dir_all(output_dir)
        .map_err(|e| anyhow!("cannot create {}: {e}", output_dir.display()))?;
    let dest = checkpoint_dir(output_dir, c.state.global_step);
    let tmp = sibling(&dest, "tmp");
    // Only this process uses names with its pid; one found here is a dead run's leftover.
    remove_dir_if_present(&tmp)?;
    fs::create_dir(&tmp).map_err(|e| anyhow!("cannot create {}: {e}", tmp.display()))?;

    let written = write_contents(&tmp, c, &params, &exp_avg, &exp_avg_sq)
        .and_then(|()| replace_dir(&tmp, &dest));
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written?;
    sync_dir(output_dir);
    Ok(dest)
}

fn write_contents<B: Backend>(
    dir: &Path,
    c: &CheckpointContents<B>,
    params: &[f32],
    exp_avg: &[f32],
    exp_avg_sq: &[f32],
) -> Result<()> {
    let model = c.model;
    save_pretrained(dir, &model.cfg, &model.layout, params, c.tokenizer_dir)?;
    write_optimizer(
        &dir.join(OPTIMIZER_FILE),
        &model.layout,
        exp_avg,
        exp_avg_sq,
        c.optimizer.step,
    )?;
    let scheduler = SchedulerFile {
        kind: kind_name(c.schedule.kind).into(),
        base_lr: c.schedule.base_lr,
        warmup_steps: c.schedule.warmup_steps,
        total_steps: c.schedule.total_steps,
        // LambdaLR steps once per optimizer step, so its last_epoch is the optimizer's count.
        last_step: c.optimizer.step,
    };
    write_json(&dir.join(SCHEDULER_FILE), &serde_json::to_value(scheduler)?)?;
    write_json(
        &dir.join(RNG_STATE_FILE),
        &serde_json::to_value(c.position)?,
    )?;
    if let Some(scaler) = c.loss_scaler {
        write_json(&dir.join(SCALER_FILE), &serde_json::to_value(scaler)?)?;
    }
    c.state.save(&dir.join(TRAINER_STATE_FILE))?;
    write_json(&dir.join(TRAINING_ARGS_FILE), c.args)?;
    sync_dir(dir);
    Ok(())
}

/// `checkpoint-N.<what>-<pid>`: a name next to `dest` that no reader takes for a checkpoint.
fn sibling(dest: &Path, what: &str) -> PathBuf {
    let name = dest
        .file_name()
        .expect("checkpoint paths end in a folder name")
        .to_string_lossy();
    dest.with_file_name(format!("{name}.{what}-{}", std::process::id()))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            bail!("cannot remove {}: {e}", dir.display())
        }
        _ => Ok(()),
    }
}

/// Renames the complete folder `tmp` to `dest`. A non-empty folder cannot be renamed over, so
/// an existing `dest` is first moved aside (still whole, under a name no reader picks), then
/// removed once the new one is in place.
fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    if fs::symlink_metadata(dest).is_err() {
        return fs::rename(tmp, dest)
            .map_err(|e| anyhow!("cannot rename {} to {}: {e}", tmp.display(), dest.display()));
    }
    let old = sibling(dest, "replaced");
    remove_dir_if_present(&old)?;
    fs::rename(dest, &old).map_err(|e| {
        anyhow!(
            "cannot move the previous {} aside to replace it: {e}",
            dest.display()
        )
    })?;
    if let Err(e) = fs::rename(tmp, dest) {
        // Put the previous checkpoint back: an old checkpoint beats none.
        let _ = fs::rename(&old, dest);
        bail!("cannot rename {} to {}: {e}", tmp.display(), dest.display());
    }
    fs::remove_dir_all(&old).map_err(|e| {
        anyhow!(
            "{} was saved, but the version it replaced could not be removed from {}: {e}",
            dest.display(),
            old.display()
        )
    })
}

/// Makes renames inside `dir` durable (best effort: not every platform can sync a folder).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// `optimizer.safetensors`: `exp_avg.<name>` and `exp_avg_sq.<name>` for every parameter, F32,
/// with the step count in the metadata.
fn write_optimizer(
    path: &Path,
    layout: &ParamLayout,
    exp_avg: &[f32],
    exp_avg_sq: &[f32],
    step: u64,
) -> Result<()> {
    let moments = [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)];
    let mut offset = 0;
    let mut infos = Vec::with_capacity(2 * layout.specs.len());
    for (prefix, _) in &moments {
        for s in &layout.specs {
            let end = offset + s.len() * 4;
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: s.shape.clone(),
                data_offsets: (offset, end),
            };
            infos.push((format!("{prefix}.{}", s.name), info));
            offset = end;
        }
    }
    // "format": "pt" as in every safetensors file transformers writes; "step" so the file
    // alone is enough to continue AdamW's bias correction.
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    let metadata = Metadata::new(Some(meta), infos).map_err(|e| anyhow!("{e}"))?;
    let mut header = serde_json::to_vec(&metadata)?;
    // The data must start 8-byte aligned; the format pads the header with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');

    write_atomic(path, |tmp| {
        // Streamed in chunks: the moments are twice the model's size, too much to copy whole.
        let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut bytes = Vec::with_capacity(1 << 16);
        for (_, flat) in &moments {
            for chunk in flat.chunks(1 << 14) {
                bytes.clear();
                bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                out.write_all(&bytes)?;
            }
        }
        out.flush()?;
        Ok(())
    })
}

/// Reads the checkpoint folder `dir` for a model of config `cfg` (whose layout is `layout`).
/// Every error is one line naming the file at fault.
pub fn load_checkpoint(
    dir: &Path,
    cfg: &BertConfig,
    layout: &ParamLayout,
) -> Result<LoadedCheckpoint> {
    ensure!(
        *layout == ParamLayout::new(cfg),
        "the parameter layout given to load_checkpoint was not built from this config"
    );
    ensure!(dir.is_dir(), "{}: no such checkpoint folder", dir.display());
    check_model_config(&dir.join(CONFIG_FILE), layout)?;

    let model_path = dir.join(MODEL_FILE);
    let mut params = vec![0f32; layout.total];
    read_f32_tensors(&model_path, layout, &mut [("", &mut params)])?;

    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut exp_avg = vec![0f32; layout.total];
    let mut exp_avg_sq = vec![0f32; layout.total];
    let meta = read_f32_tensors(
        &opt_path,
        layout,
        &mut [("exp_avg.", &mut exp_avg), ("exp_avg_sq.", &mut exp_avg_sq)],
    )?;
    let adam_step = meta
        .get("step")
        .ok_or_else(|| anyhow!("{}: no \"step\" in the metadata", opt_path.display()))?
        .parse::<u64>()
        .map_err(|e| {
            anyhow!(
                "{}: metadata \"step\" is not a step count ({e})",
                opt_path.display()
            )
        })?;

    let sched_path = dir.join(SCHEDULER_FILE);
    let s: SchedulerFile = read_json(&sched_path)?;
    let kind = s
        .kind
        .parse::<ScheduleKind>()
        .map_err(|e| anyhow!("{}: {e}", sched_path.display()))?;
    let schedule = Schedule {
        kind,
        base_lr: s.base_lr,
        warmup_steps: s.warmup_steps,
        total_steps: s.total_steps,
    };

    Ok(LoadedCheckpoint {
        params,
        exp_avg,
        exp_avg_sq,
        adam_step,
        schedule,
        schedule_last_step: s.last_step,
        position: read_json(&dir.join(RNG_STATE_FILE))?,
        loss_scaler: match dir.join(SCALER_FILE) {
            p if p.is_file() => Some(read_json(&p)?),
            _ => None,
        },
        state: TrainerState::load(&dir.join(TRAINER_STATE_FILE))?,
        args: read_json(&dir.join(TRAINING_ARGS_FILE))?,
    })
}

/// The checkpoint's `config.json` must describe a model of the same shape as the one resuming.
fn check_model_config(path: &Path, layout: &ParamLayout) -> Result<()> {
    let saved = BertConfig::from_file(path).map_err(|e| anyhow!("{e:#}"))?;
    let saved = ParamLayout::new(&saved);
    if saved == *layout {
        return Ok(());
    }
    let detail = layout
        .specs
        .iter()
        .find_map(|s| match saved.get(&s.name) {
            None => Some(format!("it has no {}", s.name)),
            Some(t) if t.shape != s.shape => Some(format!(
                "{} is {:?} there, {:?} here",
                s.name, t.shape, s.shape
            )),
            Some(_) => None,
        })
        .unwrap_or_else(|| "its parameters differ".into());
    bail!(
        "{}: the checkpoint is of a differently shaped model ({detail})",
        path.display()
    )
}

/// Fills each `(prefix, buffer)` with the tensors `<prefix><param name>` of the safetensors
/// file `path`, in layout order, and returns the file's metadata.
fn read_f32_tensors(
    path: &Path,
    layout: &ParamLayout,
    targets: &mut [(&str, &mut Vec<f32>)],
) -> Result<HashMap<String, String>> {
    let map = map_file(path).map_err(|e| anyhow!("{e:#}"))?;
    let invalid = |e| anyhow!("{}: not a valid safetensors file ({e})", path.display());
    let (_, metadata) = SafeTensors::read_metadata(&map).map_err(invalid)?;
    let file = SafeTensors::deserialize(&map).map_err(invalid)?;
    for (prefix, flat) in targets.iter_mut() {
        for spec in &layout.specs {
            let name = format!("{prefix}{}", spec.name);
            let view = file
                .tensor(&name)
                .map_err(|_| anyhow!("{}: tensor {name} is missing", path.display()))?;
            copy_tensor(
                &view,
                &mut flat[spec.offset..spec.offset + spec.len()],
                &spec.shape,
            )
            .map_err(|e| anyhow!("{}: tensor {name} {e}", path.display()))?;
        }
    }
    Ok(metadata.metadata().clone().unwrap_or_default())
}

/// The checkpoints in `output_dir` as `(step, path)`, by step. Only folders named exactly
/// `checkpoint-<N>` count; a missing `output_dir` has none.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("cannot list {}: {e}", output_dir.display()),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| anyhow!("cannot list {}: {e}", output_dir.display()))?;
        let Some(step) = entry.file_name().to_str().and_then(checkpoint_step) else {
            continue;
        };
        // is_dir follows symlinks, as transformers' os.path.isdir does.
        if entry.path().is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint with the highest step in `output_dir` (transformers' `get_last_checkpoint`).
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, path)| path))
}

/// Deletes old checkpoints so at most `save_total_limit` remain, as transformers 5's
/// `rotate_checkpoints` (called with `use_mtime=True` by `_save_checkpoint`) does: checkpoints
/// are ordered by modification time (by step when their times lie within a second of each
/// other, where mtime says nothing), the most recent one and `best_model_checkpoint` are never
/// deleted, and the oldest others go first. Returns the deleted folders, oldest first.
pub fn rotate_checkpoints(
    output_dir: &Path,
    save_total_limit: Option<usize>,
    best_model_checkpoint: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let limit = match save_total_limit {
        Some(limit) if limit > 0 => limit,
        _ => return Ok(Vec::new()),
    };
    let checkpoints = sorted_for_rotation(output_dir)?;
    if checkpoints.len() <= limit {
        return Ok(Vec::new());
    }
    let newest = checkpoints
        .last()
        .expect("more than limit > 0 checkpoints")
        .clone();
    let best = best_model_checkpoint;
    let protected = |c: &Path| same_path(c, &newest) || best.is_some_and(|b| same_path(c, b));
    // As transformers counts its protected set: a best checkpoint other than the newest raises
    // the floor to two even when it is not among the folders (then one more old one survives).
    let keep = limit.max(if best.is_some_and(|b| !same_path(b, &newest)) {
        2
    } else {
        1
    });

    let mut remaining = checkpoints.len();
    let mut deleted = Vec::new();
    for checkpoint in &checkpoints {
        if remaining <= keep {
            break;
        }
        if protected(checkpoint) {
            continue;
        }
        // Renamed first, so an interrupted removal never leaves a partial checkpoint-N behind.
        let doomed = sibling(checkpoint, "deleting");
        fs::rename(checkpoint, &doomed)
            .map_err(|e| anyhow!("cannot delete {}: {e}", checkpoint.display()))?;
        fs::remove_dir_all(&doomed)
            .map_err(|e| anyhow!("cannot delete {}: {e}", doomed.display()))?;
        deleted.push(checkpoint.clone());
        remaining -= 1;
    }
    Ok(deleted)
}

/// transformers' `sort_checkpoints(use_mtime=True)`: oldest first by modification time, unless
/// the newest and oldest times are under a second apart (coarse or fake mtimes), then by step.
fn sorted_for_rotation(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let by_step = list_checkpoints(output_dir)?;
    let mut by_time = Vec::with_capacity(by_step.len());
    for (step, path) in &by_step {
        let modified = fs::metadata(path).and_then(|m| m.modified()).map_err(|e| {
            anyhow!(
                "cannot read the modification time of {}: {e}",
                path.display()
            )
        })?;
        by_time.push((modified, *step, path.clone()));
    }
    by_time.sort();
    let spread = match (by_time.first(), by_time.last()) {
        (Some(first), Some(last)) => last.0.duration_since(first.0).unwrap_or_default(),
        _ => Default::default(),
    };
    if spread.as_secs_f64() < 1.0 {
        return Ok(by_step.into_iter().map(|(_, p)| p).collect());
    }
    Ok(by_time.into_iter().map(|(_, _, p)| p).collect())
}

/// The same folder, however the two paths spell it (transformers compares normalized strings;
/// resolving both also equates relative and absolute spellings).
fn same_path(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_checkpoint_names_count() {
        assert_eq!(checkpoint_step("checkpoint-10"), Some(10));
        assert_eq!(checkpoint_step("checkpoint-007"), Some(7));
        for name in [
            "checkpoint-12.tmp-123",
            "checkpoint-12.replaced-5",
            "checkpoint-",
            "checkpoint-1a",
            "checkpoint-+1",
            "checkpoint10",
            "runs",
            "checkpoint-99999999999999999999999",
        ] {
            assert_eq!(checkpoint_step(name), None, "{name}");
        }
    }

    #[test]
    fn kind_names_parse_back() {
        for kind in [
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::Constant,
            ScheduleKind::ConstantWithWarmup,
        ] {
            assert_eq!(kind_name(kind).parse::<ScheduleKind>().unwrap(), kind);
        }
    }
}
