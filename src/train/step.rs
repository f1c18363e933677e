//! One optimizer step: forward and backward over each micro-batch (gradient accumulation),
//! global-norm clipping, one AdamW update.
//!
//! The loss is the mean over all rows of the accumulated batch, so `k` micro-batches give the
//! same update as one batch holding all of their rows, whatever their sizes.
//!
//! On a backend whose GEMMs read fp16, the step runs as PyTorch AMP's with a `GradScaler`: the
//! loss is scaled before backward, the gradients unscaled (and checked for inf/NaN) before
//! clipping, and an overflowed step is skipped (see [`crate::train::loss_scale`]).

use anyhow::{ensure, Result};

use crate::backend::{Backend, MatmulPrecision};
use crate::model::bert::{ActivationArena, Activations, Batch, LossSpec, Mode};
use crate::model::Classifier;
use crate::train::loss_scale::{LossScaler, ScaleChange};
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
    /// Mean loss over the rows of all micro-batches.
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
/// the device scalars the step reads back, and the fp16 loss scaler.
pub struct StepScratch<B: Backend> {
    pub acts: ActivationCache<B>,
    /// `[Σg², found_inf]`: read back with one copy at the end of the step.
    readback: B::Tensor,
    sumsq: B::Tensor,
    found_inf: B::Tensor,
    /// Present when the backend's GEMMs read fp16 (`--fp16`): dynamic loss scaling.
    pub loss_scaler: Option<LossScaler>,
}

impl<B: Backend> StepScratch<B> {
    pub fn new(backend: &B) -> Result<Self> {
        let readback = backend.zeros(2)?;
        let fp16 = backend.matmul_precision() == MatmulPrecision::F16;
        Ok(StepScratch {
            acts: ActivationCache::default(),
            sumsq: backend.view(&readback, 0, 1),
            found_inf: backend.view(&readback, 1, 1),
            readback,
            loss_scaler: fp16.then(LossScaler::default),
        })
    }
}

/// One optimizer step at learning rate `lr` over `micro_batches`. `micro_step` numbers the
/// first micro-batch among all micro-batches of the run (it keys the dropout streams).
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
    ensure!(
        !micro_batches.is_empty(),
        "an optimizer step needs at least one batch"
    );
    let normalizer: usize = micro_batches.iter().map(|b| b.size()).sum();
    let scaler = scratch.loss_scaler;
    let spec = LossSpec {
        label_smoothing: s.label_smoothing,
        normalizer,
        loss_scale: scaler.map_or(1.0, |l| l.scale_f32()),
    };
    let bert = model.bert(backend);
    model.zero_grads(backend)?;
    let mut loss_sum = 0.0f64;
    for (k, batch) in micro_batches.iter().enumerate() {
        let mode = match s.dropout_seed {
            Some(seed) => Mode::Train {
                seed,
                step: micro_step + k as u64,
            },
            None => Mode::Eval,
        };
        let acts = &scratch.acts.get(backend, model, batch)?;
        bert.forward(batch, acts, mode)?;
        loss_sum += bert
            .losses(batch, acts, s.label_smoothing)?
            .iter()
            .map(|&l| l as f64)
            .sum::<f64>();
        bert.backward(&model.grad_views, batch, acts, mode, spec)?;
    }
    if let Some(l) = scaler {
        backend.fill_zero(&scratch.found_inf)?;
        backend.unscale_and_check(&model.grads, l.inv_scale_f32(), &scratch.found_inf)?;
    }
    clip_grad_norm(backend, &model.grads, &scratch.sumsq, s.max_grad_norm)?;
    let readback = backend.download(&scratch.readback)?;
    let (grad_norm, found_inf) = (readback[0].sqrt(), readback[1] != 0.0);
    let scale_change = match scratch.loss_scaler.as_mut() {
        Some(l) => l.update(found_inf),
        None => ScaleChange::Kept,
    };
    // An overflowed fp16 step changes nothing (GradScaler.step skips optimizer.step()).
    if !matches!(scale_change, ScaleChange::Backoff { .. }) {
        opt.update(backend, lr)?;
    }
    Ok(StepReport {
        loss: loss_sum / normalizer as f64,
        grad_norm,
        lr,
        scale_change,
    })
}
