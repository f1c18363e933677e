//! Times full training steps of one setting.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::backend::Backend;
use crate::bench::memory::MemoryProbe;
use crate::bench::stats::{Measurement, Setting};
use crate::bench::workload::random_batch;
use crate::model::bert::Batch;
use crate::model::flops::train_flops_per_step;
use crate::model::Classifier;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::step::{queue_train_step, StepScratch, StepSettings};

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
///
/// The timed steps are queued as the trainer queues them, with no host synchronization between
/// them: their losses are read back once, at the end of the timed window, and that read-back
/// (which waits for every queued kernel) is inside the window. So the time is that of steps as
/// training runs them, not of steps that each wait for the device. A step's time is the gap
/// between the host's returns from queueing it and the step before (the last one's gap ends
/// with the read-back): on a synchronous backend (the CPU), the step's own time; on a GPU, once
/// the host has filled the launch queue, the device's pace. They add up to the window.
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
    let batch_of =
        |step: u64| random_batch(backend, cfg, setting.batch, setting.seq_len, seed, step);
    let queue = |opt: &mut AdamW<B>, scratch: &mut StepScratch<B>, batch: &Batch<B>, step| {
        queue_train_step(
            backend,
            model,
            opt,
            scratch,
            std::slice::from_ref(batch),
            step,
            &|_| LEARNING_RATE,
            &step_settings,
        )
        .with_context(|| format!("batch {}, step {step}", setting.batch))
    };
    let warmup = setting.warmup_steps as u64;
    for step in 0..warmup {
        queue(&mut opt, &mut scratch, &batch_of(step)?, step)?;
    }
    // Every timed batch is drawn and uploaded before the clock starts, as a prefetching data
    // loader has them ready.
    let batches = (warmup..warmup + setting.steps as u64)
        .map(batch_of)
        .collect::<Result<Vec<_>>>()?;
    // The warm-up's work is finished before the clock starts.
    scratch.take_reports(backend, &mut opt)?;
    let start = Instant::now();
    let mut queued = Vec::with_capacity(batches.len());
    for (batch, step) in batches.iter().zip(warmup..) {
        queue(&mut opt, &mut scratch, batch, step)?;
        queued.push(start.elapsed());
    }
    // The one read-back: it waits for every queued step. (A window of over 65,536 rows fills the
    // ledger of queued losses, which then reads back as it fills, as in training.)
    let reports = scratch.take_reports(backend, &mut opt)?;
    let window = start.elapsed();
    let mut ends = queued;
    if let Some(last) = ends.last_mut() {
        *last = window;
    }
    let step_times = ends
        .iter()
        .scan(Duration::ZERO, |before, &end| {
            let gap = end - *before;
            *before = end;
            Some(gap)
        })
        .collect();
    Ok(Measurement {
        setting,
        step_times,
        flops_per_step: train_flops_per_step(cfg, setting.batch, setting.seq_len),
        peak_memory_bytes: memory.peak_bytes(backend),
        last_loss: reports.last().map_or(f64::NAN, |r| r.loss),
    })
}
