//! `bertft-cuda predict`: one JSON object per input row, in input order.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::backend::Backend;
use crate::cli::load::{load_model, resolve_model_dir, select_backend, Selected};
use crate::cli::train::columns;
use crate::data::dataset::{read_dataset, Columns};
use crate::data::encoded::EncodedSet;
use crate::data::sampler::Batching;
use crate::data::tokenize::TextTokenizer;
use crate::model::weights::write_atomic;
use crate::model::Classifier;
use crate::train::args::PredictArgs;
use crate::train::evaluate::{argmax, predict, softmax, Predictions};
use crate::train::step::ActivationCache;

/// `{"label", "label_id", "score", "logits", "probs"}` per row, to `output` (written to a
/// temporary name, then renamed) or to standard output.
pub fn write_predictions(
    p: &Predictions,
    id2label: &[String],
    output: Option<&Path>,
) -> Result<()> {
    let mut text = String::new();
    for logits in &p.logits {
        let probs = softmax(logits);
        let id = argmax(logits);
        let row = json!({"label": id2label[id], "label_id": id, "score": probs[id], "logits": logits, "probs": probs});
        text += &row.to_string();
        text.push('\n');
    }
    match output {
        Some(path) => write_atomic(path, |tmp| std::fs::write(tmp, &text).map_err(Into::into)),
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .context("writing predictions"),
    }
}

pub fn run(args: &PredictArgs) -> Result<()> {
    args.data.check_token_budget()?;
    match select_backend(args.data.device, args.data.matmul_precision()?)? {
        Selected::Cpu(b) => run_on(&b, args),
        Selected::Cuda(b) => run_on(&*b, args),
    }
}

fn run_on<B: Backend>(backend: &B, args: &PredictArgs) -> Result<()> {
    let dir = resolve_model_dir(&args.data.model)?;
    let loaded = load_model(&dir, 0)?;
    let max_len = args
        .data
        .max_seq_length
        .min(loaded.cfg.max_position_embeddings);
    let set = read_unlabelled(
        &args.test_file,
        &columns(&args.data),
        &loaded.tokenizer,
        max_len,
    )?;
    let model = Classifier::new(backend, loaded.cfg, &loaded.flat)?;
    let mut acts = ActivationCache::default();
    predict_and_write(
        backend,
        &model,
        &mut acts,
        &set,
        args.data.eval_batching(),
        args.output.as_deref(),
    )
}

/// A file of texts to classify (a label column, if any, is ignored), tokenized.
pub fn read_unlabelled(
    path: &Path,
    cols: &Columns,
    tokenizer: &TextTokenizer,
    max_len: usize,
) -> Result<EncodedSet> {
    let raw = read_dataset(path, cols, false)?;
    EncodedSet::encode(tokenizer, &raw.texts, raw.pairs.as_deref(), None, max_len)
}

/// `trainer.predict()` on `set`, written as JSONL to `output` or standard output.
pub fn predict_and_write<B: Backend>(
    backend: &B,
    model: &Classifier<B>,
    acts: &mut ActivationCache<B>,
    set: &EncodedSet,
    batching: Batching,
    output: Option<&Path>,
) -> Result<()> {
    let p = predict(backend, model, acts, set, batching, 0.0)?;
    write_predictions(&p, &model.cfg.id2label, output)
}
