//! What every subcommand starts with: the backend, and a model folder's config, weights and
//! tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cli::hub;

use crate::backend::cpu::CpuBackend;
use crate::config::BertConfig;
use crate::data::tokenize::TextTokenizer;
use crate::model::params::ParamLayout;
use crate::model::weights::load_weights;
use crate::train::args::DeviceChoice;

/// The backend for `--device`. This build has the CPU backend only: `auto` falls back to it
/// with a notice, `cuda` is refused.
pub fn choose_backend(device: DeviceChoice, fp16: bool, bf16: bool) -> Result<CpuBackend> {
    match device {
        DeviceChoice::Cuda => {
            bail!("--device cuda: this build has no CUDA backend yet; use --device cpu")
        }
        DeviceChoice::Auto => {
            eprintln!("notice: no CUDA backend in this build; running on the CPU")
        }
        DeviceChoice::Cpu => {}
    }
    if fp16 || bf16 {
        eprintln!("notice: --fp16/--bf16 apply to the GPU; the CPU computes in fp32");
    }
    Ok(CpuBackend)
}

/// A local model folder, or a hub repository id fetched into the local cache (see `hub`).
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(model);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    if dir.is_dir() {
        bail!("{}: not a model folder (no config.json)", dir.display());
    }
    if hub::looks_like_repo_id(model) {
        return hub::fetch_model(model, "main").with_context(|| {
            format!("--model {model}: no such folder, and fetching it from the hub failed")
        });
    }
    bail!("--model {model}: no such folder")
}

pub struct LoadedModel {
    pub dir: PathBuf,
    pub cfg: BertConfig,
    pub layout: ParamLayout,
    pub flat: Vec<f32>,
    pub tokenizer: TextTokenizer,
}

/// Config, tokenizer and weights of `dir`, with `id2label` (when given) replacing the model's
/// labels first, so a classifier of the right size is loaded or initialized.
pub fn load_model(dir: &Path, id2label: Option<Vec<String>>, seed: u64) -> Result<LoadedModel> {
    let mut cfg = BertConfig::from_file(&dir.join("config.json"))?;
    if let Some(labels) = id2label {
        cfg.set_labels(labels);
    }
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let layout = ParamLayout::new(&cfg);
    let loaded = load_weights(dir, &cfg, &layout, seed)?;
    for notice in &loaded.notices {
        eprintln!("notice: {notice}");
    }
    Ok(LoadedModel {
        dir: dir.to_path_buf(),
        cfg,
        layout,
        flat: loaded.flat,
        tokenizer,
    })
}
