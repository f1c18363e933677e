//! `bertft-cuda bench`: an end-to-end training benchmark on any backend, printing the columns
//! `benches/hf_reference.py` prints for PyTorch and the Hugging Face Trainer (see
//! `benches/README.md`).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::backend::{Backend, MatmulPrecision};
use crate::bench::measure::measure;
use crate::bench::memory::MemoryProbe;
use crate::bench::peak::peak_tflops;
use crate::bench::report::{self, RunInfo};
use crate::bench::stats::{Measurement, Setting};
use crate::cli::load::{resolve_model_dir, select_backend, Selected};
use crate::config::BertConfig;
use crate::model::flops::{matmul_params, train_flops_per_token};
use crate::model::init::random_init;
use crate::model::params::ParamLayout;
use crate::model::weights::load_weights;
use crate::model::Classifier;
use crate::train::args::DeviceChoice;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A model folder (config.json, model.safetensors) or hub id, benchmarked with its weights.
    #[arg(long, conflicts_with = "config")]
    model: Option<String>,
    /// A randomly initialized model (transformers' init): a built-in config name
    /// (bert-base-uncased, 2 labels) or a config.json path. The default without --model.
    #[arg(long)]
    config: Option<String>,
    /// Sequences per step; repeat the option or give a comma list (32,64) for several settings.
    #[arg(long = "batch-size", value_delimiter = ',', default_values_t = [32])]
    batch_sizes: Vec<usize>,
    /// Tokens per sequence, every one a real token (no padding).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed training steps per setting.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps before them (buffers allocated, caches and cuBLAS warmed up).
    #[arg(long, default_value_t = 3)]
    warmup_steps: usize,
    /// Where to run, as `train --device`.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Mixed precision as `train --fp16`: fp16 GEMM operands, dynamic loss scaling.
    #[arg(long)]
    fp16: bool,
    /// Mixed precision as `train --bf16`: bf16 GEMM operands.
    #[arg(long, conflicts_with = "fp16")]
    bf16: bool,
    /// fp32 GEMMs on TF32 tensor cores, as `train --tf32`.
    #[arg(long)]
    tf32: bool,
    /// Each step as a CUDA graph, as `train --cuda-graphs`.
    #[arg(long)]
    cuda_graphs: bool,
    /// Seed of the initialization, the random batches and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Peak TFLOP/s for MFU. Default on CUDA: 989 for H100/H200 (dense fp16/bf16); on the CPU
    /// and other GPUs MFU is printed as "-" unless this is given.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Also write the results to this JSON file (rewritten after each setting).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The model under test: its config, weights, and a name for the report.
struct BenchModel {
    cfg: BertConfig,
    flat: Vec<f32>,
    label: String,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    check_args(args)?;
    // The model is read before the backend is opened, so that a bad --model or --config fails
    // fast, before any kernel is compiled.
    let model = bench_model(args)?;
    ensure!(
        args.seq_len <= model.cfg.max_position_embeddings,
        "--seq-len {} is over the model's max_position_embeddings ({})",
        args.seq_len,
        model.cfg.max_position_embeddings
    );
    let precision = MatmulPrecision::from_flags(args.fp16, args.bf16, args.tf32);
    match select_backend(args.device, precision)?.with_cuda_graphs(args.cuda_graphs) {
        Selected::Cpu(b) => run_on(&b, args, model, MemoryProbe::HostRss, false),
        Selected::Cuda(b) => {
            run_on(&*b, args, model, MemoryProbe::Device, true)?;
            if let Some(s) = b.graph_stats() {
                // What the graphs did: every timed step should be a replay.
                println!(
                    "CUDA graphs: {} captured, {} replayed ({} kernel nodes patched), {} \
                     replays given up, {} shapes without a graph",
                    s.captures, s.replays, s.patched_nodes, s.mismatches, s.failures
                );
            }
            Ok(())
        }
    }
}

fn check_args(args: &BenchArgs) -> Result<()> {
    ensure!(
        args.batch_sizes.iter().all(|&b| b >= 1),
        "--batch-size must be at least 1"
    );
    ensure!(args.seq_len >= 1, "--seq-len must be at least 1");
    ensure!(args.steps >= 1, "--steps must be at least 1");
    if let Some(peak) = args.peak_tflops {
        ensure!(
            peak.is_finite() && peak > 0.0,
            "--peak-tflops must be a positive number, not {peak}"
        );
    }
    if let Some(path) = &args.json {
        // Checked now rather than after a long run.
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        ensure!(
            parent.is_dir(),
            "--json {}: no folder {}",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

fn bench_model(args: &BenchArgs) -> Result<BenchModel> {
    if let Some(model) = &args.model {
        let dir = resolve_model_dir(model)?;
        let cfg = BertConfig::from_file(&dir.join("config.json"))?;
        let layout = ParamLayout::new(&cfg);
        let loaded = load_weights(&dir, &cfg, &layout, args.seed)?;
        for notice in &loaded.notices {
            eprintln!("notice: {notice}");
        }
        return Ok(BenchModel {
            cfg,
            flat: loaded.flat,
            label: dir.display().to_string(),
        });
    }
    let name = args.config.as_deref().unwrap_or("bert-base-uncased");
    let cfg = config_by_name_or_path(name)?;
    let layout = ParamLayout::new(&cfg);
    Ok(BenchModel {
        flat: random_init(&cfg, &layout, args.seed),
        cfg,
        label: format!("{name} (random init, seed {})", args.seed),
    })
}

/// `--config`: a config.json path when one exists there, else a built-in name.
fn config_by_name_or_path(name: &str) -> Result<BertConfig> {
    let path = Path::new(name);
    if path.is_file() {
        return BertConfig::from_file(path).context("--config");
    }
    if path.is_dir() && path.join("config.json").is_file() {
        return BertConfig::from_file(&path.join("config.json")).context("--config");
    }
    if !BertConfig::builtin_names().contains(&name) {
        bail!(
            "--config {name}: no such file, and no built-in config of that name (built-in: {})",
            BertConfig::builtin_names().join(", ")
        );
    }
    BertConfig::builtin(name)
}

fn run_on<B: Backend>(
    backend: &B,
    args: &BenchArgs,
    model: BenchModel,
    memory: MemoryProbe,
    on_cuda: bool,
) -> Result<()> {
    let BenchModel { cfg, flat, label } = model;
    let classifier = Classifier::new(backend, cfg, &flat)?;
    drop(flat);
    let cfg = &classifier.cfg;
    let info = RunInfo {
        backend: backend.name(),
        model: label,
        parameters: classifier.layout.total,
        matmul_parameters: matmul_params(cfg),
        precision: backend.matmul_precision().name(),
        peak_tflops: peak_tflops(args.peak_tflops, on_cuda, &backend.name()),
        memory,
        seed: args.seed,
        command: std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    };
    print_preamble(&info, cfg, args.seq_len);
    println!("{}", report::header(info.backend.len()));
    let mut done: Vec<Measurement> = Vec::new();
    for &batch in &args.batch_sizes {
        let setting = Setting {
            batch,
            seq_len: args.seq_len,
            warmup_steps: args.warmup_steps,
            steps: args.steps,
        };
        let m = measure(backend, &classifier, setting, args.seed, memory)?;
        if !m.last_loss.is_finite() {
            eprintln!(
                "notice: batch {batch}: the loss is {} (the timings are of a broken run)",
                m.last_loss
            );
        }
        println!("{}", report::row(&info, &m));
        done.push(m);
        if let Some(path) = &args.json {
            report::write_json(path, &report::to_json(&info, &done))?;
        }
    }
    Ok(())
}

/// What the rows have in common: the model, the FLOP count and the peak MFU is taken against.
fn print_preamble(info: &RunInfo, cfg: &BertConfig, seq_len: usize) {
    println!(
        "model: {}: {} layers, hidden {}, {} heads, intermediate {}, {} labels, {} parameters ({} in per-token matmuls)",
        info.model,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.num_labels(),
        info.parameters,
        info.matmul_parameters
    );
    println!(
        "flops: {} per token at seq {seq_len} (6·N_matmul + 12·layers·hidden·seq, forward+backward); precision flag: {}; peak: {}; memory: {}",
        train_flops_per_token(cfg, seq_len),
        info.precision,
        info.peak_tflops
            .map_or("none given (MFU \"-\"; --peak-tflops sets it)".into(), |p| format!(
                "{p} TFLOP/s"
            )),
        info.memory.describe()
    );
}
