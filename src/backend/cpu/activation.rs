//! Element-wise activations.
//!
//! `gelu` (exact):  `y = x·Φ(x) = 0.5·x·(1 + erf(x/√2))`,  `y' = Φ(x) + x·φ(x)`, `φ(x) = e^(−x²/2)/√(2π)`
//! `gelu` (tanh):   `y = 0.5·x·(1 + tanh u)`, `u = √(2/π)·(x + 0.044715·x³)`,
//!                  `y' = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh²u)·√(2/π)·(1 + 3·0.044715·x²)`
//! `relu`:          `y = max(x, 0)`, `y' = [x > 0]`
//! `tanh` (pooler): `y = tanh x`, `y' = 1 − y²` (backward reads the forward output).

use rayon::prelude::*;

use crate::backend::Activation;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

pub fn activation_value(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluErf => 0.5 * x * (1.0 + libm::erff(x * INV_SQRT_2)),
        Activation::GeluTanh => {
            let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
        Activation::Relu => x.max(0.0),
    }
}

pub fn activation_derivative(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluErf => {
            let cdf = 0.5 * (1.0 + libm::erff(x * INV_SQRT_2));
            cdf + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
        }
        Activation::GeluTanh => {
            let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            0.5 * (1.0 + t)
                + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

pub fn activation_forward(out: &mut [f32], x: &[f32], act: Activation) {
    assert_eq!(out.len(), x.len());
    out.par_iter_mut()
        .zip(x)
        .for_each(|(o, &v)| *o = activation_value(v, act));
}

pub fn activation_backward(dx: &mut [f32], dout: &[f32], x: &[f32], act: Activation) {
    assert_eq!((dx.len(), dout.len()), (x.len(), x.len()));
    dx.par_iter_mut()
        .zip(dout.par_iter().zip(x))
        .for_each(|(d, (&g, &v))| *d = g * activation_derivative(v, act));
}

pub fn tanh_forward(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    out.iter_mut().zip(x).for_each(|(o, v)| *o = v.tanh());
}

pub fn tanh_backward(dx: &mut [f32], dout: &[f32], y: &[f32]) {
    assert_eq!((dx.len(), dout.len()), (y.len(), y.len()));
    dx.iter_mut()
        .zip(dout.iter().zip(y))
        .for_each(|(d, (g, y))| *d = g * (1.0 - y * y));
}
