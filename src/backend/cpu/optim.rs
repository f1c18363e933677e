//! Gradient norm, clipping, and the AdamW update.
//!
//! Global norm: `‖g‖ = √Σ g²` over all parameters (the flat gradient buffer); clipping as
//! `clip_grad_norm_`: `g *= min(1, max_norm/(‖g‖ + 1e-6))`.
//! AdamW as `torch.optim.AdamW` (single-tensor path), step `t` (1-based):
//!   `θ *= 1 − lr·λ`; `m = m + (1−β₁)·(g − m)`; `v = β₂·v + (1−β₂)·g²`;
//!   `θ −= (lr/(1−β₁ᵗ))·m/(√v/√(1−β₂ᵗ) + ε)`.
//! The scalars are computed in f64 (as Python floats) and applied in f32 (as torch does); each
//! operation is rounded on its own, where torch's `lerp_`/`addcmul_` fuse a multiply-add, so a
//! parameter may differ from torch's by 1 ulp after a step.
//! Loss-scale unscaling as `GradScaler.unscale_`: `g *= 1/scale`, then report whether any
//! result is inf or NaN (checked after the product, which also catches its overflow); the
//! scale's update as `torch._amp_update_scale_`.

use rayon::prelude::*;

use crate::backend::AdamWStep;

pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(1 << 14)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum()
}

/// The factor `clip_grad_norm_` multiplies the gradients by.
pub fn clip_coefficient(sumsq: f64, max_norm: f32) -> f32 {
    let coef = max_norm as f64 / (sumsq.sqrt() + 1e-6);
    coef.min(1.0) as f32
}

pub fn clip_by_global_norm(x: &mut [f32], sumsq: f64, max_norm: f32) {
    let coef = clip_coefficient(sumsq, max_norm);
    if coef < 1.0 {
        x.par_iter_mut().for_each(|v| *v *= coef);
    }
}

/// `x *= inv_scale` in place; true when any result is inf or NaN.
pub fn unscale_and_check(x: &mut [f32], inv_scale: f32) -> bool {
    x.par_iter_mut()
        .map(|v| {
            *v *= inv_scale;
            !v.is_finite()
        })
        .reduce(|| false, |a, b| a | b)
}

/// `GradScaler`'s scale update over `state = [scale, growth_tracker]` (fp32, as on the GPU;
/// the scale stays a power of two, so fp32 holds it exactly).
pub fn update_loss_scale(
    state: &mut [f32],
    found_inf: bool,
    growth: f32,
    backoff: f32,
    growth_interval: u32,
) {
    let (scale, tracker) = (state[0], state[1]);
    (state[0], state[1]) = if found_inf {
        (scale * backoff, 0.0)
    } else if tracker + 1.0 >= growth_interval as f32 {
        let grown = scale * growth;
        (if grown.is_finite() { grown } else { scale }, 0.0)
    } else {
        (scale, tracker + 1.0)
    };
}

pub fn adamw_update(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    weight_decay: f64,
    s: &AdamWStep,
) {
    assert!(grad.len() == param.len() && m.len() == param.len() && v.len() == param.len());
    let t = s.step as i32;
    let decay = (1.0 - s.lr * weight_decay) as f32;
    let step_size = (s.lr / (1.0 - s.beta1.powi(t))) as f32;
    let bc2_sqrt = ((1.0 - s.beta2.powi(t)).sqrt()) as f32;
    let (b1c, b2, b2c, eps) = (
        (1.0 - s.beta1) as f32,
        s.beta2 as f32,
        (1.0 - s.beta2) as f32,
        s.eps as f32,
    );
    param
        .par_iter_mut()
        .zip(grad)
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            if weight_decay != 0.0 {
                *p *= decay;
            }
            *m += b1c * (g - *m);
            *v = *v * b2 + b2c * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * (*m / denom);
        });
}
