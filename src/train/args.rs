//! Command-line arguments, named as transformers' `TrainingArguments` and the run_glue example
//! name them (in kebab-case), with their defaults.
//!
//! Every option can also come from a JSON file (`--args-file`, keys as in Python: `output_dir`,
//! `learning_rate`, …), as `HfArgumentParser.parse_json_file` reads them; options given on the
//! command line override the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::backend::MatmulPrecision;
use crate::data::sampler::Batching;

/// `true`/`false` as Python's argparse helpers accept them (`--fp16`, `--fp16 true`, `--fp16 False`).
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected true or false, found {s:?}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalStrategy {
    No,
    Steps,
    Epoch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveStrategy {
    No,
    Steps,
    Epoch,
    Best,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportTo {
    None,
    Tensorboard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingStrategy {
    Random,
    Sequential,
    GroupByLength,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    Auto,
    Cuda,
    Cpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerChoice {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

/// The model, the data files and their columns (run_glue's `ModelArguments` and
/// `DataTrainingArguments`).
#[derive(Args, Clone, Debug, Serialize)]
pub struct DataArgs {
    /// A model folder (config.json, model.safetensors, tokenizer files); a hub id when online.
    #[arg(long, alias = "model-name-or-path")]
    pub model: String,
    /// Column of the text (default: `sentence`, else `text`).
    #[arg(long)]
    pub text_column: Option<String>,
    /// Column of the second text of a pair.
    #[arg(long)]
    pub text_pair_column: Option<String>,
    /// Column of the label.
    #[arg(long)]
    pub label_column: Option<String>,
    /// Longer texts are truncated to this many tokens (pairs: longest first).
    #[arg(long, default_value_t = 128)]
    pub max_seq_length: usize,
    /// Where to run: `cuda` (the GPU; it needs a driver, NVRTC and cuBLAS) or `cpu`; `auto`
    /// runs on the CPU, with a notice, until the CUDA backend has been validated on a GPU.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Mixed precision as PyTorch AMP: fp16 GEMM operands with fp32 accumulation and fp32
    /// master weights; training uses dynamic loss scaling (start 2^16, ×2 after 2000 clean
    /// steps, ×0.5 and the step skipped on inf/NaN). On the CPU the rounding is emulated.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub fp16: bool,
    /// Mixed precision bf16: bf16 GEMM operands, fp32 accumulation, no loss scaling.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub bf16: bool,
    /// fp32 GEMMs on TF32 tensor cores (10-bit mantissa operands); off by default, as
    /// PyTorch's matmuls.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub tf32: bool,
    /// Form batches by a token budget (ours, not a TrainingArguments field): each batch holds as
    /// many consecutive sequences (in the epoch's sampling order; the dataset's order for
    /// evaluation and prediction) as have at most N real tokens together, and a longer sequence
    /// is a batch on its own. --per-device-train-batch-size (training) and
    /// --per-device-eval-batch-size (evaluation, prediction) then cap the rows per batch.
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_batch: Option<usize>,
}

impl DataArgs {
    /// The GEMM precision the flags ask for; `--fp16` with `--bf16` is refused (as
    /// `TrainingArguments` refuses it).
    pub fn matmul_precision(&self) -> Result<MatmulPrecision> {
        if self.fp16 && self.bf16 {
            bail!("--fp16 and --bf16: at most one of them can be true");
        }
        Ok(MatmulPrecision::from_flags(self.fp16, self.bf16, self.tf32))
    }

    /// A one-line error for a batch size or budget no sequence fits in.
    pub fn check_token_budget(&self) -> Result<()> {
        if self.max_tokens_per_batch == Some(0) {
            bail!("--max-tokens-per-batch must be at least 1 (tokens per batch), found 0");
        }
        if self.per_device_eval_batch_size == 0 {
            bail!("--per-device-eval-batch-size must be at least 1");
        }
        Ok(())
    }

    /// How evaluation and prediction cut the dataset, in its order, into batches.
    pub fn eval_batching(&self) -> Batching {
        let rows = self.per_device_eval_batch_size.max(1);
        match self.max_tokens_per_batch {
            Some(max_tokens) => Batching::Tokens {
                max_tokens,
                max_rows: rows,
            },
            None => Batching::Rows {
                size: rows,
                drop_last: false,
            },
        }
    }
}

#[derive(Args, Clone, Debug, Serialize)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Training file (.csv, .tsv or .jsonl).
    #[arg(long)]
    pub train_file: PathBuf,
    /// Evaluation file, labelled.
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    /// File to predict after training (written to output_dir/predict_results.jsonl).
    #[arg(long)]
    pub test_file: Option<PathBuf>,

    /// Where the model, checkpoints and logs go.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Allow an existing, non-empty output_dir.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub overwrite_output_dir: bool,
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides num_train_epochs when positive.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping; 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    #[arg(long, value_enum, default_value_t = SchedulerChoice::Linear)]
    pub lr_scheduler_type: SchedulerChoice,
    /// Warmup steps; a value below 1 is a ratio of the total steps (as in transformers 5).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_steps: f64,
    /// Warmup as a ratio of the total steps (older spelling of a fractional --warmup-steps).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,

    #[arg(long, alias = "evaluation-strategy", value_enum, default_value_t = IntervalStrategy::No)]
    pub eval_strategy: IntervalStrategy,
    /// Evaluate every this many steps (default: logging_steps); below 1, a ratio of the total.
    #[arg(long)]
    pub eval_steps: Option<f64>,
    #[arg(long, value_enum, default_value_t = IntervalStrategy::Steps)]
    pub logging_strategy: IntervalStrategy,
    /// Log every this many steps; below 1, a ratio of the total.
    #[arg(long, default_value_t = 500.0)]
    pub logging_steps: f64,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub logging_first_step: bool,
    /// TensorBoard and JSONL logs (default: output_dir/runs/<time>).
    #[arg(long)]
    pub logging_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = SaveStrategy::Steps)]
    pub save_strategy: SaveStrategy,
    /// Save every this many steps; below 1, a ratio of the total.
    #[arg(long, default_value_t = 500.0)]
    pub save_steps: f64,
    /// Keep at most this many checkpoints (the best one is always kept).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub load_best_model_at_end: bool,
    /// `loss`, `accuracy`, `f1`, … (with or without `eval_`); default `loss` when tracking.
    #[arg(long)]
    pub metric_for_best_model: Option<String>,
    /// Default: false for a loss, true otherwise.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub greater_is_better: Option<bool>,
    /// Stop after this many evaluations without improvement.
    #[arg(long)]
    pub early_stopping_patience: Option<u32>,
    #[arg(long, default_value_t = 0.0)]
    pub early_stopping_threshold: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing_factor: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Seed of the data order (default: seed).
    #[arg(long)]
    pub data_seed: Option<u64>,
    #[arg(long, value_enum, default_value_t = ReportTo::None)]
    pub report_to: ReportTo,
    /// A checkpoint folder, or `true` for the newest in output_dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    #[arg(long, value_enum, default_value_t = SamplingStrategy::Random)]
    pub train_sampling_strategy: SamplingStrategy,
    /// Same as --train-sampling-strategy group_by_length.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub group_by_length: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub dataloader_drop_last: bool,
    /// Run each training step on the GPU as a CUDA graph (ours, not a TrainingArguments field):
    /// captured the second time a batch shape comes, then replayed with the new batch's
    /// arguments, without a launch per kernel. Off by default until it has been validated on a
    /// GPU; ignored on the CPU.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub cuda_graphs: bool,
}

impl TrainArgs {
    /// The options' checks that clap cannot make, as one-line errors.
    pub fn check_batching(&self) -> Result<()> {
        self.data.check_token_budget()?;
        if self.per_device_train_batch_size == 0 {
            bail!("--per-device-train-batch-size must be at least 1");
        }
        if self.gradient_accumulation_steps == 0 {
            bail!("--gradient-accumulation-steps must be at least 1");
        }
        if self.data.max_tokens_per_batch.is_some() && self.dataloader_drop_last {
            // A budget batch has no full size that a last, short batch would fall below.
            bail!("--max-tokens-per-batch does not combine with --dataloader-drop-last");
        }
        Ok(())
    }

    /// How an epoch's order is cut into micro-batches.
    pub fn train_batching(&self) -> Batching {
        match self.data.max_tokens_per_batch {
            Some(max_tokens) => Batching::Tokens {
                max_tokens,
                max_rows: self.per_device_train_batch_size.max(1),
            },
            None => Batching::Rows {
                size: self.per_device_train_batch_size,
                drop_last: self.dataloader_drop_last,
            },
        }
    }
}

#[derive(Args, Clone, Debug, Serialize)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Labelled file to evaluate (.csv, .tsv or .jsonl).
    #[arg(long, alias = "test-file")]
    pub validation_file: PathBuf,
    /// Also write the metrics to output_dir/eval_results.json.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing_factor: f32,
}

#[derive(Args, Clone, Debug, Serialize)]
pub struct PredictArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// File of texts to classify (.csv, .tsv or .jsonl; a label column is not needed).
    #[arg(long)]
    pub test_file: PathBuf,
    /// JSONL predictions, one per input row in input order (default: standard output).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// The command line with `--args-file FILE` expanded: the file's options first, so that those
/// given on the command line win (clap keeps the last occurrence).
pub fn expand_args_file(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(at) = argv.iter().position(|a| a == "--args-file") else {
        return Ok(argv);
    };
    let Some(path) = argv.get(at + 1) else {
        bail!("--args-file needs a file")
    };
    let from_file = args_from_json(Path::new(path))?;
    let mut out: Vec<OsString> = argv[..at].to_vec();
    // The subcommand must come before its options.
    let split = out.len().min(2);
    let tail = out.split_off(split);
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(tail);
    out.extend(argv[at + 2..].iter().cloned());
    Ok(out)
}

/// `{"learning_rate": 2e-5, "fp16": true, "output_dir": "out"}` → `--learning-rate 2e-05 --fp16 true --output-dir out`.
fn args_from_json(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let serde_json::Value::Object(map) = value else {
        bail!("{}: expected a JSON object of arguments", path.display())
    };
    let mut out = Vec::new();
    for (key, v) in map {
        let flag = format!("--{}", key.replace('_', "-"));
        let value = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s,
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            other => bail!(
                "{}: argument {key:?} must be a string, number or boolean, found {other}",
                path.display()
            ),
        };
        out.push(flag);
        out.push(value);
    }
    Ok(out)
}
