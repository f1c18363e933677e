//! Times full training steps of one setting.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::backend::Backend;
use crate::bench::memory::MemoryProbe;
use crate::bench::stats::{Measurement, Setting};
use crate::bench::workload::random_batch;
use crate::model::flops::train_flops_per_step;
use crate::model::Classifier;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::step::{train_step, StepScratch, StepSettings};

/// The Trainer's defaults for what a step does: clipping at 1.0, dropout on, AdamW (no weight
/// decay) at a constant learning rate (a schedule costs nothing measurable).
const STEP: StepSettings = StepSettings {
    max_grad_norm: 1.0,
    label_smoothing: 0.0,
    dropout_seed: None,
};
const LEARNING_RATE: f64 = 5e-5;

/// Runs `setting.warmup_steps` untimed then `setting.steps` timed training steps (forward,
/// backward, clipping, AdamW) of `model` on fresh random batches. The optimizer state and the
/// activations are this setting's own, so its peak memory is what training at this shape needs.
pub fn measure<B: Backend>(
    backend: &B,
    model: &Classifier<B>,
    setting: Setting,
    seed: u64,
    memory: MemoryProbe,
) -> Result<Measurement> {
    let cfg = &model.cfg;
    let step_settings = StepSettings {
        dropout_seed: Some(seed),
        ..STEP
    };
    memory.reset(backend);
    let mut opt = AdamW::new(
        backend,
        &model.layout,
        &model.params,
        &model.grads,
        AdamWConfig::default(),
    )?;
    let mut scratch = StepScratch::new(backend)?;
    let mut step_times = Vec::with_capacity(setting.steps);
    let mut last_loss = f64::NAN;
    for step in 0..(setting.warmup_steps + setting.steps) as u64 {
        // Drawn and uploaded before the clock starts, as a prefetching data loader would.
        let batch = random_batch(backend, cfg, setting.batch, setting.seq_len, seed, step)?;
        let start = Instant::now();
        // train_step ends by downloading the gradient norm, which waits for every queued kernel:
        // the clock is read after the step's work has finished, on any backend.
        let report = train_step(
            backend,
            model,
            &mut opt,
            &mut scratch,
            std::slice::from_ref(&batch),
            step,
            LEARNING_RATE,
            &step_settings,
        )
        .with_context(|| format!("batch {}, step {step}", setting.batch))?;
        let elapsed = start.elapsed();
        if step >= setting.warmup_steps as u64 {
            step_times.push(elapsed);
        }
        last_loss = report.loss;
    }
    Ok(Measurement {
        setting,
        step_times,
        flops_per_step: train_flops_per_step(cfg, setting.batch, setting.seq_len),
        peak_memory_bytes: memory.peak_bytes(backend),
        last_loss,
    })
}
