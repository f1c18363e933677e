//! What every subcommand starts with: the backend, and a model folder's config, weights and
//! tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cli::hub;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::MatmulPrecision;
use crate::config::BertConfig;
use crate::data::tokenize::TextTokenizer;
use crate::model::params::ParamLayout;
use crate::model::weights::load_weights;
use crate::train::args::DeviceChoice;

/// The backend `--device` selects: `cpu`; `cuda`, which requires a usable GPU; `auto`, which
/// for now stays on the CPU with a notice: the CUDA backend has not been validated on a GPU yet
/// (tests/cuda_ops.rs), and silently wrong numbers would be worse than slow ones. Once it has,
/// `auto` takes the GPU when there is one.
pub enum Selected {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl Selected {
    /// The same, with the training step run as CUDA graphs when `on` (see
    /// [`CudaBackend::with_cuda_graphs`]); the CPU has none, and says so.
    pub fn with_cuda_graphs(self, on: bool) -> Self {
        match self {
            Selected::Cuda(b) => Selected::Cuda(Box::new(b.with_cuda_graphs(on))),
            Selected::Cpu(b) => {
                if on {
                    eprintln!("notice: --cuda-graphs is ignored on the CPU");
                }
                Selected::Cpu(b)
            }
        }
    }
}

/// Set to 1, batches are padded to their sequence and row buckets (with dummy sequences) as they
/// are when steps run as CUDA graphs, on any backend: the padded path alone, for tests on the
/// CPU and to tell a padding problem from a graph problem on a GPU.
const BUCKET_PADDING: &str = "BERTFT_BUCKET_PADDING";

pub fn select_backend(device: DeviceChoice, precision: MatmulPrecision) -> Result<Selected> {
    let selected = select_device(device, precision)?;
    if std::env::var_os(BUCKET_PADDING).is_some_and(|v| v == "1") {
        eprintln!("notice: {BUCKET_PADDING}=1: batches are padded to their buckets");
        return Ok(match selected {
            Selected::Cpu(b) => Selected::Cpu(b.with_bucket_padding()),
            Selected::Cuda(b) => Selected::Cuda(Box::new(b.with_bucket_padding())),
        });
    }
    Ok(selected)
}

fn select_device(device: DeviceChoice, precision: MatmulPrecision) -> Result<Selected> {
    let cpu = || {
        if precision != MatmulPrecision::F32 {
            eprintln!(
                "notice: {} on the CPU is emulated (GEMM operands rounded as the GPU reads \
                 them): the GPU's numbers, not its speed",
                precision.name()
            );
        }
        Selected::Cpu(CpuBackend::with_matmul_precision(precision))
    };
    if precision == MatmulPrecision::Tf32 && tf32_overridden(std::env::var_os(TF32_OVERRIDE)) {
        eprintln!("notice: {TF32_OVERRIDE}=0 is set: cuBLAS ignores --tf32 and computes in fp32");
    }
    Ok(match device {
        DeviceChoice::Cpu => cpu(),
        DeviceChoice::Cuda => Selected::Cuda(Box::new(
            CudaBackend::new(0)
                .context("--device cuda")?
                .with_matmul_precision(precision),
        )),
        DeviceChoice::Auto => {
            eprintln!(
                "notice: running on the CPU (the CUDA backend is not validated on a GPU yet; \
                 --device cuda tries it)"
            );
            cpu()
        }
    })
}

/// NVIDIA's switch that turns TF32 off in cuBLAS and cuDNN whatever the program asks.
const TF32_OVERRIDE: &str = "NVIDIA_TF32_OVERRIDE";

fn tf32_overridden(value: Option<std::ffi::OsString>) -> bool {
    value.is_some_and(|v| v == "0")
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

/// Config, tokenizer and weights of `dir`.
pub fn load_model(dir: &Path, seed: u64) -> Result<LoadedModel> {
    load_model_with(dir, BertConfig::from_file(&dir.join("config.json"))?, seed)
}

/// Tokenizer and weights of `dir` under `cfg` (its config, possibly relabelled, so that a
/// classifier of the right size is loaded or initialized).
pub fn load_model_with(dir: &Path, cfg: BertConfig, seed: u64) -> Result<LoadedModel> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_zero_overrides_tf32() {
        assert!(tf32_overridden(Some("0".into())));
        assert!(!tf32_overridden(Some("1".into())));
        assert!(!tf32_overridden(None));
    }
}
