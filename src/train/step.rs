//! One optimizer step: forward and backward over each micro-batch (gradient accumulation),
//! global-norm clipping, one AdamW update.
//!
//! The loss is the mean over all rows of the accumulated batch, so `k` micro-batches give the
//! same update as one batch holding all of their rows, whatever their sizes.

use anyhow::{ensure, Result};

use crate::backend::Backend;
use crate::model::bert::{ActivationArena, Activations, Batch, LossSpec, Mode};
use crate::model::Classifier;
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
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f64,
}

/// Scratch a step needs besides activations.
pub struct StepScratch<B: Backend> {
    pub acts: ActivationCache<B>,
    sumsq: B::Tensor,
}

impl<B: Backend> StepScratch<B> {
    pub fn new(backend: &B) -> Result<Self> {
        Ok(StepScratch {
            acts: ActivationCache::default(),
            sumsq: backend.zeros(1)?,
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
    let spec = LossSpec {
        label_smoothing: s.label_smoothing,
        normalizer,
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
    clip_grad_norm(backend, &model.grads, &scratch.sumsq, s.max_grad_norm)?;
    let grad_norm = backend.download(&scratch.sumsq)?[0].sqrt();
    opt.update(backend, lr)?;
    Ok(StepReport {
        loss: loss_sum / normalizer as f64,
        grad_norm,
        lr,
    })
}
