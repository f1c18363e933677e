//! `bertft-cuda evaluate`: `trainer.evaluate()` on a labelled file.

use std::path::Path;

use anyhow::{Context, Result};

use crate::backend::Backend;
use crate::cli::load::{load_model, resolve_model_dir, select_backend, Selected};
use crate::cli::train::columns;
use crate::data::dataset::{read_dataset, Columns, LabelMap};
use crate::data::encoded::EncodedSet;
use crate::data::sampler::Batching;
use crate::data::tokenize::TextTokenizer;
use crate::model::Classifier;
use crate::train::args::EvaluateArgs;
use crate::train::evaluate::{eval_metrics, predict};
use crate::train::metrics::format_metrics_line;
use crate::train::pyjson::{PyDict, PyValue};
use crate::train::state::write_metrics_json;
use crate::train::step::ActivationCache;

/// A labelled file, tokenized, its labels mapped through the model's labels.
pub fn read_labelled(
    path: &Path,
    cols: &Columns,
    labels: &LabelMap,
    tokenizer: &TextTokenizer,
    max_len: usize,
) -> Result<EncodedSet> {
    let raw = read_dataset(path, cols, true)?;
    let ids = labels.encode(&raw)?;
    EncodedSet::encode(
        tokenizer,
        &raw.texts,
        raw.pairs.as_deref(),
        Some(ids),
        max_len,
    )
}

/// Prints the Trainer's metrics line and, given a folder, writes eval_results.json there.
pub fn print_and_save_metrics(metrics: &[(String, f64)], output_dir: Option<&Path>) -> Result<()> {
    println!("{}", format_metrics_line(metrics));
    if let Some(dir) = output_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let map = PyDict::of_floats(metrics);
        write_metrics_json(&dir.join("eval_results.json"), &PyValue::Dict(map))?;
    }
    Ok(())
}

pub fn run(args: &EvaluateArgs) -> Result<()> {
    args.data.check_token_budget()?;
    match select_backend(args.data.device, args.data.matmul_precision()?)? {
        Selected::Cpu(b) => run_on(&b, args),
        Selected::Cuda(b) => run_on(&*b, args),
    }
}

fn run_on<B: Backend>(backend: &B, args: &EvaluateArgs) -> Result<()> {
    let dir = resolve_model_dir(&args.data.model)?;
    let loaded = load_model(&dir, 0)?;
    let labels = LabelMap {
        id2label: loaded.cfg.id2label.clone(),
    };
    let max_len = args
        .data
        .max_seq_length
        .min(loaded.cfg.max_position_embeddings);
    let set = read_labelled(
        &args.validation_file,
        &columns(&args.data),
        &labels,
        &loaded.tokenizer,
        max_len,
    )?;
    let model = Classifier::new(backend, loaded.cfg, &loaded.flat)?;
    let mut acts = ActivationCache::default();
    let report = EvalReport {
        smoothing: args.label_smoothing_factor,
        epoch: None,
        output_dir: args.output_dir.as_deref(),
    };
    let batching = args.data.eval_batching();
    evaluate_and_report(backend, &model, &mut acts, &set, batching, &report)
}

/// How an evaluation is reported: the loss's label smoothing, the epoch (during training), and
/// where eval_results.json goes.
pub struct EvalReport<'a> {
    pub smoothing: f32,
    pub epoch: Option<f64>,
    pub output_dir: Option<&'a Path>,
}

/// `trainer.evaluate()` on `set`: prints the metrics line and writes eval_results.json.
pub fn evaluate_and_report<B: Backend>(
    backend: &B,
    model: &Classifier<B>,
    acts: &mut ActivationCache<B>,
    set: &EncodedSet,
    batching: Batching,
    report: &EvalReport,
) -> Result<()> {
    let p = predict(backend, model, acts, set, batching, report.smoothing)?;
    let labels = set.labels.as_deref().unwrap_or_default();
    let mut metrics = eval_metrics(&p, labels, model.cfg.num_labels());
    if let Some(epoch) = report.epoch {
        metrics.push(("epoch".into(), epoch));
    }
    metrics.push(("eval_samples".into(), set.len() as f64));
    print_and_save_metrics(&metrics, report.output_dir)
}
