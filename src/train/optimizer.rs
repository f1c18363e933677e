//! AdamW over the flat parameter buffer with the Trainer's two parameter groups, and global
//! gradient-norm clipping.
//!
//! The Trainer puts every weight but biases and LayerNorm weights in a group with weight decay
//! and the rest in a group without; here each maximal run of adjacent parameters of one group
//! is a segment, and one `adamw_update` call covers all segments.

use anyhow::Result;

use crate::backend::{AdamWStep, AdamWTensor, Backend};
use crate::model::params::ParamLayout;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `TrainingArguments`' defaults.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Segment<T> {
    param: T,
    grad: T,
    exp_avg: T,
    exp_avg_sq: T,
    decay: bool,
}

/// Optimizer state: both moments (flat, in the parameter layout) and the step count.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub exp_avg: B::Tensor,
    pub exp_avg_sq: B::Tensor,
    /// Optimizer steps taken.
    pub step: u64,
    segments: Vec<Segment<B::Tensor>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(
        backend: &B,
        layout: &ParamLayout,
        params: &B::Tensor,
        grads: &B::Tensor,
        config: AdamWConfig,
    ) -> Result<Self> {
        let exp_avg = backend.zeros(layout.total)?;
        let exp_avg_sq = backend.zeros(layout.total)?;
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        for s in &layout.specs {
            match runs.last_mut() {
                Some((_, len, decay)) if *decay == s.decay => *len += s.len(),
                _ => runs.push((s.offset, s.len(), s.decay)),
            }
        }
        let segments = runs
            .into_iter()
            .map(|(o, n, decay)| Segment {
                param: backend.view(params, o, n),
                grad: backend.view(grads, o, n),
                exp_avg: backend.view(&exp_avg, o, n),
                exp_avg_sq: backend.view(&exp_avg_sq, o, n),
                decay,
            })
            .collect();
        Ok(AdamW {
            config,
            exp_avg,
            exp_avg_sq,
            step: 0,
            segments,
        })
    }

    /// One update of every parameter at learning rate `lr`.
    pub fn update(&mut self, backend: &B, lr: f64) -> Result<()> {
        self.update_unless(backend, lr, None)
    }

    /// [`AdamW::update`], which the device skips when `skip[0] != 0` (an fp16 overflow). The
    /// step count assumes it was not skipped; whoever learns otherwise calls
    /// [`AdamW::uncount_skipped_step`].
    pub fn update_unless(&mut self, backend: &B, lr: f64, skip: Option<&B::Tensor>) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let tensors: Vec<AdamWTensor<'_, B::Tensor>> = self
            .segments
            .iter()
            .map(|s| AdamWTensor {
                param: &s.param,
                grad: &s.grad,
                exp_avg: &s.exp_avg,
                exp_avg_sq: &s.exp_avg_sq,
                weight_decay: if s.decay { c.weight_decay } else { 0.0 },
            })
            .collect();
        let step = AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            step: self.step,
        };
        backend.adamw_update(&tensors, &step, skip)
    }
}

impl<B: Backend> AdamW<B> {
    /// Takes back the step count of an update the device skipped.
    pub fn uncount_skipped_step(&mut self) {
        self.step -= 1;
    }
}

/// The global L2 norm of `grads` before clipping, as `clip_grad_norm_` returns it; the
/// gradients are scaled down to `max_norm` when above it (`max_norm <= 0`: no clipping).
/// `sumsq` is a one-element scratch tensor that holds Σg² afterwards (no host sync needed).
pub fn clip_grad_norm<B: Backend>(
    backend: &B,
    grads: &B::Tensor,
    sumsq: &B::Tensor,
    max_norm: f32,
) -> Result<()> {
    backend.sum_squares(sumsq, grads)?;
    if max_norm > 0.0 {
        backend.clip_by_global_norm(grads, sumsq, max_norm)?;
    }
    Ok(())
}
