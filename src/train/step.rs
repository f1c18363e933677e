//! One optimizer step: forward and backward over each micro-batch (gradient accumulation),
//! global-norm clipping, one AdamW update.
//!
//! The loss is the mean over all rows of the accumulated batch, so `k` micro-batches give the
//! same update as one batch holding all of their rows, whatever their sizes.
//!
//! On a backend whose GEMMs read fp16, the step runs as PyTorch AMP's with a `GradScaler`: the
//! loss is scaled before backward, the gradients unscaled (and checked for inf/NaN) before
//! clipping, and an overflowed step is skipped (see [`crate::train::loss_scale`]).
//!
//! A queued step does not wait for the device: its per-row losses and gradient norm are copied
//! into a ledger on the device and read back only when the trainer asks (on logging steps), so
//! the host can queue the next step while the device still runs this one.
//!
//! fp16 keeps that property (where `GradScaler.step` reads its inf/NaN flag back at once): the
//! loss scale lives on the device, the overflow flag makes the AdamW kernel write nothing, and
//! the scale is updated by a kernel. The host learns about an overflow one step late, from a
//! copy of the flag queued right after the unscaling ([`StepScratch::settle`]): before the next
//! step's learning rate is computed, so that the schedule and AdamW's step count leave out a
//! skipped step exactly as accelerate's do.

use anyhow::{ensure, Result};

use crate::backend::{Backend, MatmulPrecision};
use crate::model::bert::{ActivationArena, Activations, Batch, LossSpec, Mode};
use crate::model::Classifier;
use crate::train::loss_scale::{
    LossScaler, ScaleChange, BACKOFF_FACTOR, GROWTH_FACTOR, GROWTH_INTERVAL,
};
use crate::train::optimizer::{clip_grad_norm, AdamW};

/// Activation buffers for every batch shape of a run (see [`ActivationArena`]).
pub struct ActivationCache<B: Backend> {
    arena: ActivationArena<B::Tensor>,
}

impl<B: Backend> Default for ActivationCache<B> {
    fn default() -> Self {
        ActivationCache {
            arena: ActivationArena::default(),
        }
    }
}

impl<B: Backend> ActivationCache<B> {
    /// Grows the buffers to fit every one of `batches`, so that [`ActivationCache::get`] for
    /// them allocates nothing: called before a [`Backend::run_region`], whose CUDA graph must
    /// not hand its own memory to a cache that outlives it.
    pub fn reserve(
        &mut self,
        backend: &B,
        model: &Classifier<B>,
        batches: &[&Batch<B>],
    ) -> Result<()> {
        for batch in batches {
            self.get(backend, model, batch)?;
        }
        Ok(())
    }

    pub fn get(
        &mut self,
        backend: &B,
        model: &Classifier<B>,
        batch: &Batch<B>,
    ) -> Result<Activations<B::Tensor>> {
        self.arena
            .get(backend, &model.cfg, batch.rows(), batch.size())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct StepSettings {
    /// `max_grad_norm`; 0 turns clipping off.
    pub max_grad_norm: f32,
    pub label_smoothing: f32,
    /// `None`: dropout off (as in `model.eval()`); `Some(seed)`: dropout drawn from `seed`.
    pub dropout_seed: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Mean loss over the rows (real sequences) of all micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping (inf or NaN on an overflowed fp16 step).
    pub grad_norm: f32,
    pub lr: f64,
    /// The fp16 loss scale's change after this step; `Backoff` means the step was skipped.
    pub scale_change: ScaleChange,
}

impl StepReport {
    /// Whether the optimizer skipped this step (fp16 gradients overflowed).
    pub fn skipped(&self) -> bool {
        matches!(self.scale_change, ScaleChange::Backoff { .. })
    }
}

/// What a step keeps between steps besides the model and the optimizer: activation buffers,
/// the device scalars it computes, the [`Ledger`] of what it has not read back yet, and the
/// fp16 loss scaler.
pub struct StepScratch<B: Backend> {
    pub acts: ActivationCache<B>,
    sumsq: B::Tensor,
    /// The per-row losses of the step being queued, all micro-batches back to back: written
    /// inside the step's graph region at fixed places, then copied into the ledger.
    step_losses: B::Tensor,
    ledger: Ledger<B>,
    /// Present when the backend's GEMMs read fp16 (`--fp16`): dynamic loss scaling.
    scaler: Option<DeviceScaler<B>>,
}

/// fp16's loss scaler: its state on the device, the host's copy of it (exact once settled), and
/// the overflow flag of the last queued step on its way to the host.
struct DeviceScaler<B: Backend> {
    /// `[scale, growth_tracker, found_inf]`: the first two as `update_loss_scale` keeps them,
    /// the last the step's overflow flag; read back whole, so the host's copy is the device's.
    state: B::Tensor,
    /// `state[0..2]`, `state[0]`, `state[2]`.
    scale_and_tracker: B::Tensor,
    scale: B::Tensor,
    found_inf: B::Tensor,
    mirror: LossScaler,
    /// The state after the last queued step, on its way to the host.
    pending: Option<B::Pending>,
}

/// Per-row losses and gradient norms of steps not yet read back, kept on the device so that a
/// step needs no host synchronization: they are read (one download each) when the trainer
/// asks, on logging steps, or when the ledger is full.
struct Ledger<B: Backend> {
    /// `[ROW_CAPACITY]`: the per-row losses of the pending steps' micro-batches, back to back.
    losses: B::Tensor,
    /// `[STEP_CAPACITY]`: each pending step's Σg² (before clipping).
    sumsq: B::Tensor,
    rows_used: usize,
    row_capacity: usize,
    step_capacity: usize,
    pending: Vec<PendingStep>,
    /// Reports already read back (the ledger filled up) and not yet taken.
    ready: Vec<StepReport>,
}

/// What the host knows of a step whose numbers are still on the device.
struct PendingStep {
    first_row: usize,
    /// Rows of all its micro-batches: the loss is their mean.
    rows: usize,
    lr: f64,
    /// Known once the step is settled (fp16); `Kept` otherwise.
    scale_change: ScaleChange,
}

/// The ledger's default size: 256 KiB of losses, enough for several logging intervals.
const ROW_CAPACITY: usize = 1 << 16;
const STEP_CAPACITY: usize = 1 << 12;
/// Rows of [`StepScratch::step_losses`] to start with (grown to a power of two when a step has
/// more).
const STEP_LOSSES: usize = 1 << 10;

impl<B: Backend> Ledger<B> {
    fn new(backend: &B, row_capacity: usize, step_capacity: usize) -> Result<Self> {
        ensure!(
            row_capacity >= 1 && step_capacity >= 1,
            "the step ledger needs room for a row and a step"
        );
        Ok(Ledger {
            losses: backend.zeros(row_capacity)?,
            sumsq: backend.zeros(step_capacity)?,
            rows_used: 0,
            row_capacity,
            step_capacity,
            pending: Vec::new(),
            ready: Vec::new(),
        })
    }

    /// Whether making room for a step of `rows` rows reads back the pending steps.
    fn must_read_before(&self, rows: usize) -> bool {
        self.rows_used + rows > self.row_capacity || self.pending.len() == self.step_capacity
    }

    /// Makes room for a step of `rows` rows, reading back the pending steps when it lacks it
    /// (and growing the loss buffer for a step larger than it).
    fn reserve(&mut self, backend: &B, rows: usize) -> Result<()> {
        if self.must_read_before(rows) {
            let reports = self.read(backend)?;
            self.ready.extend(reports);
        }
        if rows > self.row_capacity {
            self.row_capacity = rows.next_power_of_two();
            self.losses = backend.zeros(self.row_capacity)?;
        }
        Ok(())
    }

    /// Copies one step's per-row losses in (a device-to-device copy).
    fn record_losses(&mut self, backend: &B, losses: &B::Tensor) -> Result<()> {
        let n = backend.len(losses);
        backend.copy(&backend.view(&self.losses, self.rows_used, n), losses)?;
        self.rows_used += n;
        Ok(())
    }

    /// Reads back every pending step (one download of the losses, one of the norms) and
    /// returns their reports, oldest first.
    fn read(&mut self, backend: &B) -> Result<Vec<StepReport>> {
        if self.pending.is_empty() {
            // Rows of a step that failed half-way are dropped with it.
            self.rows_used = 0;
            return Ok(Vec::new());
        }
        let losses = backend.download(&backend.view(&self.losses, 0, self.rows_used))?;
        let sumsq = backend.download(&backend.view(&self.sumsq, 0, self.pending.len()))?;
        let reports = self
            .pending
            .drain(..)
            .zip(sumsq)
            .map(|(p, sumsq)| {
                let rows = &losses[p.first_row..p.first_row + p.rows];
                let loss_sum: f64 = rows.iter().map(|&l| l as f64).sum();
                StepReport {
                    loss: loss_sum / p.rows as f64,
                    grad_norm: sumsq.sqrt(),
                    lr: p.lr,
                    scale_change: p.scale_change,
                }
            })
            .collect();
        self.rows_used = 0;
        Ok(reports)
    }
}

impl<B: Backend> StepScratch<B> {
    pub fn new(backend: &B) -> Result<Self> {
        Self::with_ledger_capacity(backend, ROW_CAPACITY, STEP_CAPACITY)
    }

    /// With a ledger of `rows` loss rows and `steps` steps (tests use small ones to make it
    /// fill up).
    pub fn with_ledger_capacity(backend: &B, rows: usize, steps: usize) -> Result<Self> {
        let mut scratch = StepScratch {
            acts: ActivationCache::default(),
            sumsq: backend.zeros(1)?,
            step_losses: backend.zeros(STEP_LOSSES)?,
            ledger: Ledger::new(backend, rows, steps)?,
            scaler: None,
        };
        if backend.matmul_precision() == MatmulPrecision::F16 {
            scratch.set_loss_scaler(backend, LossScaler::default())?;
        }
        Ok(scratch)
    }

    /// The fp16 loss scaler as the host knows it (exact after [`StepScratch::settle`]); `None`
    /// when the backend does not compute in fp16.
    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.scaler.as_ref().map(|s| s.mirror)
    }

    /// Sets the fp16 loss scaler (a resumed run's), on the device too. Does nothing when the
    /// backend does not compute in fp16.
    pub fn set_loss_scaler(&mut self, backend: &B, scaler: LossScaler) -> Result<()> {
        if backend.matmul_precision() != MatmulPrecision::F16 {
            return Ok(());
        }
        ensure!(
            self.scaler.as_ref().is_none_or(|s| s.pending.is_none()),
            "the loss scaler was replaced before its last step was settled"
        );
        let state = backend.upload(&[scaler.scale as f32, scaler.growth_tracker as f32, 0.0])?;
        self.scaler = Some(DeviceScaler {
            scale_and_tracker: backend.view(&state, 0, 2),
            scale: backend.view(&state, 0, 1),
            found_inf: backend.view(&state, 2, 1),
            state,
            mirror: scaler,
            pending: None,
        });
        Ok(())
    }

    /// Reads back the scaler's state after the last queued fp16 step (waiting for that step's
    /// unscaling only) and brings the host up to date: the scaler's copy and, when the step was
    /// skipped, the optimizer's step count. Returns that step's change of scale (`None`: nothing
    /// to settle). [`queue_train_step`] settles the step before it just ahead of its AdamW
    /// update; call it before reading `opt.step` or the scaler otherwise (saving a checkpoint).
    pub fn settle(&mut self, backend: &B, opt: &mut AdamW<B>) -> Result<Option<ScaleChange>> {
        let Some(scaler) = self.scaler.as_mut() else {
            return Ok(None);
        };
        let Some(pending) = scaler.pending.take() else {
            return Ok(None);
        };
        let state = backend.download_finish(pending)?;
        let (before, found_inf) = (scaler.mirror, state[2] != 0.0);
        scaler.mirror = LossScaler {
            scale: state[0] as f64,
            growth_tracker: state[1] as u32,
        };
        let (from, to) = (before.scale, scaler.mirror.scale);
        let change = if found_inf {
            opt.uncount_skipped_step();
            ScaleChange::Backoff { from, to }
        } else if to != from {
            ScaleChange::Growth { from, to }
        } else {
            ScaleChange::Kept
        };
        let step = self
            .ledger
            .pending
            .last_mut()
            .ok_or_else(|| anyhow::anyhow!("an fp16 flag without its step"))?;
        step.scale_change = change;
        Ok(Some(change))
    }

    /// The reports of every step queued so far and not yet taken, oldest first. Waits for the
    /// device to finish them (the one host synchronization of the training loop).
    pub fn take_reports(&mut self, backend: &B, opt: &mut AdamW<B>) -> Result<Vec<StepReport>> {
        self.settle(backend, opt)?;
        let mut reports = std::mem::take(&mut self.ledger.ready);
        reports.extend(self.ledger.read(backend)?);
        Ok(reports)
    }
}

/// What makes two steps the same sequence of device ops: the shape of each micro-batch, and
/// which optional parts run (dropout, fp16 loss scaling, clipping).
fn region_key<B: Backend>(micro_batches: &[Batch<B>], s: &StepSettings, scaled: bool) -> Vec<u64> {
    let mut key = vec![
        s.dropout_seed.is_some() as u64,
        scaled as u64,
        (s.max_grad_norm > 0.0) as u64,
        micro_batches.len() as u64,
    ];
    for b in micro_batches {
        // Not the longest sequence: it only sets the attention kernels' grids, which a graph
        // patches like any argument. Nor the real sequences' count: it only sets the loss's
        // scale, an argument too. With graphs on, rows and sequences are those of the batch
        // padded to its buckets (`HostBatch::pad_to_buckets`), so that few keys serve a run.
        key.extend([b.rows() as u64, b.size() as u64]);
    }
    key
}

/// Where the real sequences' losses lie in a step's per-sequence losses (each micro-batch's
/// sequences back to back, its dummies after its real ones): `(offset, length)` runs, merged
/// where they touch, so a step without dummies has one.
fn real_loss_runs<B: Backend>(micro_batches: &[Batch<B>]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    for b in micro_batches {
        let len = b.real_size();
        match runs.last_mut() {
            Some((start, n)) if *start + *n == at => *n += len,
            _ if len > 0 => runs.push((at, len)),
            _ => {}
        }
        at += b.size();
    }
    runs
}

/// One optimizer step at learning rate `lr` over `micro_batches`, read back at once: the
/// queued step and [`StepScratch::take_reports`] (tests and benchmarks use it; the trainer
/// queues steps and reads them on logging steps).
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: Backend>(
    backend: &B,
    model: &Classifier<B>,
    opt: &mut AdamW<B>,
    scratch: &mut StepScratch<B>,
    micro_batches: &[Batch<B>],
    micro_step: u64,
    lr: f64,
    s: &StepSettings,
) -> Result<StepReport> {
    queue_train_step(
        backend,
        model,
        opt,
        scratch,
        micro_batches,
        micro_step,
        &|_| lr,
        s,
    )?;
    scratch
        .take_reports(backend, opt)?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the step left no report"))
}

/// One optimizer step over `micro_batches`, queued: its loss and gradient norm stay on the
/// device until [`StepScratch::take_reports`]. `micro_step` numbers the first micro-batch among
/// all micro-batches of the run (it keys the dropout streams). The learning rate is
/// `lr(opt.step)`, taken just before the update, once the step before is settled: with fp16,
/// whether that one overflowed is learnt only then, after this step's forward and backward are
/// queued, so the host stays a step ahead of the device. Returns the step before's change of
/// scale when this settled it (fp16).
#[allow(clippy::too_many_arguments)]
pub fn queue_train_step<B: Backend>(
    backend: &B,
    model: &Classifier<B>,
    opt: &mut AdamW<B>,
    scratch: &mut StepScratch<B>,
    micro_batches: &[Batch<B>],
    micro_step: u64,
    lr: &dyn Fn(u64) -> f64,
    s: &StepSettings,
) -> Result<Option<ScaleChange>> {
    ensure!(
        !micro_batches.is_empty(),
        "an optimizer step needs at least one batch"
    );
    // The mean is over the real sequences; the dummies of a batch padded to its sequence bucket
    // have loss 0 and are left out of the ledger.
    let normalizer: usize = micro_batches.iter().map(|b| b.real_size()).sum();
    let padded: usize = micro_batches.iter().map(|b| b.size()).sum();
    // The reports read now must carry their settled scale changes; a change settled here is
    // returned below (the trainer logs a skipped step from it).
    let settled_early = if scratch.ledger.must_read_before(normalizer) {
        scratch.settle(backend, opt)?
    } else {
        None
    };
    scratch.ledger.reserve(backend, normalizer)?;
    if backend.len(&scratch.step_losses) < padded {
        scratch.step_losses = backend.zeros(padded.next_power_of_two())?;
    }
    // fp16's loss scale is applied on the device (the `device_scale` of the backward).
    let spec = LossSpec::mean(s.label_smoothing, normalizer);
    let bert = model.bert(backend);
    let key = region_key(micro_batches, s, scratch.scaler.is_some());
    let all: Vec<&Batch<B>> = micro_batches.iter().collect();
    scratch.acts.reserve(backend, model, &all)?;
    let dense_params = model.dense_params(backend);
    backend.prepare_weight_copies(&dense_params)?;
    let (acts_cache, scaler) = (&mut scratch.acts, scratch.scaler.as_ref());
    let (step_losses, sumsq) = (&scratch.step_losses, &scratch.sumsq);
    // Forward and backward of every micro-batch, the fp16 unscaling and check, the loss
    // scale's update and the clipping: the same ops at every step of these shapes, with no
    // host copy or read-back, so a CUDA graph can stand for them (`Backend::run_region`).
    backend.run_region(&key, &mut || {
        // The weights as the GEMMs read them (16-bit), cast once for every micro-batch.
        backend.refresh_weight_copies(&dense_params)?;
        model.zero_grads(backend)?;
        let mut row = 0;
        for (k, batch) in micro_batches.iter().enumerate() {
            let mode = match s.dropout_seed {
                Some(seed) => Mode::Train {
                    seed,
                    step: micro_step + k as u64,
                },
                None => Mode::Eval,
            };
            let acts = &acts_cache.get(backend, model, batch)?;
            bert.forward(batch, acts, mode)?;
            // The losses and their gradient in one kernel, one log-sum-exp per row.
            bert.compute_losses_and_grad(batch, acts, spec)?;
            let rows = backend.len(&acts.losses);
            backend.copy(&backend.view(step_losses, row, rows), &acts.losses)?;
            row += rows;
            let device_scale = scaler.map(|l| &l.scale);
            bert.backward_from_logits_grad(&model.grad_views, batch, acts, mode, device_scale)?;
        }
        // fp16: unscale and check the gradients, and update the scale, on the device.
        if let Some(l) = scaler {
            backend.fill_zero(&l.found_inf)?;
            backend.unscale_and_check(&model.grads, &l.scale, &l.found_inf)?;
            backend.update_loss_scale(
                &l.scale_and_tracker,
                &l.found_inf,
                GROWTH_FACTOR as f32,
                BACKOFF_FACTOR as f32,
                GROWTH_INTERVAL,
            )?;
        }
        clip_grad_norm(backend, &model.grads, sumsq, s.max_grad_norm)
    })?;
    // fp16: the scaler's state after this step is copied to the host now and read one step
    // later.
    let scaler_state = match &scratch.scaler {
        Some(l) => Some(backend.download_start(&l.state)?),
        None => None,
    };
    let first_row = scratch.ledger.rows_used;
    // The real sequences' losses only (outside the region, where their count may vary).
    for (at, len) in real_loss_runs(micro_batches) {
        let losses = backend.view(&scratch.step_losses, at, len);
        scratch.ledger.record_losses(backend, &losses)?;
    }
    let slot = scratch.ledger.pending.len();
    backend.copy(
        &backend.view(&scratch.ledger.sumsq, slot, 1),
        &scratch.sumsq,
    )?;
    // The step before is settled here, not earlier: its flag was copied a whole forward and
    // backward ago, so reading it waits for nothing still queued.
    let settled = scratch.settle(backend, opt)?.or(settled_early);
    let lr = lr(opt.step);
    // An overflowed fp16 step changes nothing (GradScaler.step skips optimizer.step()): the
    // kernel reads the flag.
    let skip = scratch.scaler.as_ref().map(|l| &l.found_inf);
    opt.update_unless(backend, lr, skip)?;
    scratch.ledger.pending.push(PendingStep {
        first_row,
        rows: normalizer,
        lr,
        scale_change: ScaleChange::Kept,
    });
    if let Some(l) = scratch.scaler.as_mut() {
        l.pending = scaler_state;
    }
    Ok(settled)
}
