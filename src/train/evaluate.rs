//! One pass of the model over a dataset without dropout: logits, loss and metrics, as
//! `trainer.evaluate()` and `trainer.predict()` compute them.

use std::time::Instant;

use anyhow::Result;

use crate::backend::Backend;
use crate::data::encoded::EncodedSet;
use crate::data::sampler::Batching;
use crate::model::bert::{Batch, Mode};
use crate::model::Classifier;
use crate::train::metrics::{classification_metrics, Metrics};
use crate::train::out_of_memory::{explain_out_of_memory, BatchShape};
use crate::train::prefetch::{eval_batches, prefetch, AHEAD};
use crate::train::step::ActivationCache;

/// The first word of an evaluation region's key (a training step's is 0 or 1: dropout off or
/// on), so that the two never share a graph.
const EVAL_REGION: u64 = 2;

pub struct Predictions {
    /// `[rows][num_labels]`, in input order.
    pub logits: Vec<Vec<f32>>,
    /// Mean loss over rows (when the set has labels).
    pub loss: Option<f64>,
    pub runtime_s: f64,
    pub batches: usize,
}

/// Logits of every row, in order, in batches that `batching` cuts from the rows in order (so
/// the logits come out in input order whatever the batches' sizes).
pub fn predict<B: Backend>(
    backend: &B,
    model: &Classifier<B>,
    acts: &mut ActivationCache<B>,
    set: &EncodedSet,
    batching: Batching,
    label_smoothing: f32,
) -> Result<Predictions> {
    let start = Instant::now();
    let bert = model.bert(backend);
    let pad_id = model.cfg.pad_token_id.unwrap_or(0);
    let classes = model.cfg.num_labels();
    // Every batch's logits and losses are copied into these on the device and read back once
    // at the end, so the device never waits for the host between batches.
    let all_logits = backend.zeros(set.len() * classes)?;
    let all_losses = backend.zeros(set.len())?;
    let order: Vec<usize> = (0..set.len()).collect();
    let chunks = batching.cut(&order, &set.lengths());
    // Assembled on a producer thread while the device runs the batches before.
    prefetch(AHEAD, eval_batches(set, &chunks), |batches| {
        let mut done = 0;
        let dense_params = model.dense_params(backend);
        for host in batches {
            let mut host = host?;
            let (n, labelled) = (host.real_size(), host.labels.is_some());
            if backend.pads_to_buckets() {
                // One CUDA graph per bucket of sequence and row counts, as in training; the
                // dummy sequences come after the real `n` and are dropped below.
                host.pad_to_buckets(pad_id);
            }
            let batch = Batch::upload(backend, host)?;
            let explain = |e| {
                let shape = Some(BatchShape::of(&batch));
                explain_out_of_memory(e, shape, "--per-device-eval-batch-size")
            };
            // The forward (and loss) as one region, a CUDA graph where the backend makes them;
            // the copies to their places in the results come after it (their places move).
            let key = [
                EVAL_REGION,
                batch.rows() as u64,
                batch.size() as u64,
                labelled as u64,
            ];
            acts.reserve(backend, model, &[&batch]).map_err(explain)?;
            backend.prepare_weight_copies(&dense_params)?;
            backend
                .run_region(&key, &mut || {
                    // One cast of the weights for the batch, instead of one per GEMM launch.
                    backend.refresh_weight_copies(&dense_params)?;
                    let a = &acts.get(backend, model, &batch)?;
                    bert.forward(&batch, a, Mode::Eval)?;
                    if labelled {
                        bert.compute_losses(&batch, a, label_smoothing)?;
                    }
                    Ok(())
                })
                .map_err(explain)?;
            let a = &acts.get(backend, model, &batch)?;
            let logits_at = backend.view(&all_logits, done * classes, n * classes);
            backend.copy(&logits_at, &backend.view(&a.logits, 0, n * classes))?;
            if labelled {
                let losses = backend.view(&a.losses, 0, n);
                backend.copy(&backend.view(&all_losses, done, n), &losses)?;
            }
            done += n;
        }
        Ok(())
    })?;
    let logits: Vec<Vec<f32>> = backend
        .download(&all_logits)?
        .chunks(classes)
        .map(|c| c.to_vec())
        .collect();
    let loss_sum: f64 = match set.labels {
        Some(_) => backend
            .download(&all_losses)?
            .iter()
            .map(|&l| l as f64)
            .sum(),
        None => 0.0,
    };
    Ok(Predictions {
        logits,
        loss: set
            .labels
            .as_ref()
            .map(|_| loss_sum / set.len().max(1) as f64),
        runtime_s: start.elapsed().as_secs_f64(),
        batches: chunks.len(),
    })
}

/// Index of the largest logit (the first on ties, as `argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Softmax of one row of logits.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = row.iter().map(|&z| ((z - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// The Trainer's evaluation metrics, named as it names them (`eval_` prefix), in its order.
pub fn eval_metrics(p: &Predictions, labels: &[u32], num_labels: usize) -> Vec<(String, f64)> {
    let predicted: Vec<u32> = p.logits.iter().map(|l| argmax(l) as u32).collect();
    let Metrics {
        accuracy,
        f1,
        precision,
        recall,
        matthews_correlation,
    } = classification_metrics(&predicted, labels, num_labels);
    let runtime = p.runtime_s.max(1e-9);
    vec![
        ("eval_loss".into(), p.loss.unwrap_or(f64::NAN)),
        ("eval_accuracy".into(), accuracy),
        ("eval_f1".into(), f1),
        ("eval_precision".into(), precision),
        ("eval_recall".into(), recall),
        ("eval_matthews_correlation".into(), matthews_correlation),
        ("eval_runtime".into(), (runtime * 1e4).round() / 1e4),
        (
            "eval_samples_per_second".into(),
            ((labels.len() as f64 / runtime) * 1e3).round() / 1e3,
        ),
        (
            "eval_steps_per_second".into(),
            ((p.batches as f64 / runtime) * 1e3).round() / 1e3,
        ),
    ]
}
