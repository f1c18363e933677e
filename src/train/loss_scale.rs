//! Dynamic loss scaling for fp16 mixed precision, as `torch.amp.GradScaler` does it.
//!
//! fp16 keeps 5 exponent bits: gradients below 2⁻²⁴ flush to zero when a GEMM reads them. The
//! loss is multiplied by `scale` before backward (so every gradient is), the gradients are
//! divided by it before clipping and the optimizer, and a step whose gradients hold an inf or a
//! NaN (the scale was too large: some value overflowed 65504) is skipped. GradScaler's defaults:
//! start at 2¹⁶; after an overflow halve the scale; after 2000 consecutive clean steps double it.
//! A skipped step leaves the weights, the optimizer's moments and step count, and the
//! learning-rate schedule where they were (accelerate skips the scheduler too); the Trainer's
//! global step still advances.

use serde::{Deserialize, Serialize};

/// The scaler's state, saved in checkpoints so that a resumed run continues with the same scale.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The factor the loss is multiplied by.
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub growth_tracker: u32,
}

/// GradScaler's `init_scale`.
pub const INIT_SCALE: f64 = 65536.0;
/// GradScaler's `growth_factor`.
pub const GROWTH_FACTOR: f64 = 2.0;
/// GradScaler's `backoff_factor`.
pub const BACKOFF_FACTOR: f64 = 0.5;
/// GradScaler's `growth_interval`.
pub const GROWTH_INTERVAL: u32 = 2000;

/// What [`LossScaler::update`] did after one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleChange {
    /// A clean step; the scale is unchanged.
    Kept,
    /// The gradients overflowed: the step was skipped and the scale lowered.
    Backoff { from: f64, to: f64 },
    /// `GROWTH_INTERVAL` clean steps in a row: the scale was raised.
    Growth { from: f64, to: f64 },
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: INIT_SCALE,
            growth_tracker: 0,
        }
    }
}

impl LossScaler {
    /// The end-of-step update (`torch._amp_update_scale_`): `found_inf` says whether this
    /// step's unscaled gradients held an inf or a NaN. Training applies the rule on the device
    /// (`Backend::update_loss_scale`, read back by `StepScratch::settle`); this host statement
    /// of it is what the CPU op and the kernel are tested against.
    pub fn update(&mut self, found_inf: bool) -> ScaleChange {
        let from = self.scale;
        if found_inf {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            return ScaleChange::Backoff {
                from,
                to: self.scale,
            };
        }
        self.growth_tracker += 1;
        if self.growth_tracker == GROWTH_INTERVAL {
            self.growth_tracker = 0;
            let grown = self.scale * GROWTH_FACTOR;
            // torch keeps the scale when growing it would overflow fp32.
            if (grown as f32).is_finite() {
                self.scale = grown;
                return ScaleChange::Growth { from, to: grown };
            }
        }
        ScaleChange::Kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_two_to_the_sixteen() {
        let s = LossScaler::default();
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
    }

    #[test]
    fn overflow_halves_and_resets_the_growth_count() {
        let mut s = LossScaler::default();
        for _ in 0..1999 {
            assert_eq!(s.update(false), ScaleChange::Kept);
        }
        assert_eq!(
            s.update(true),
            ScaleChange::Backoff {
                from: 65536.0,
                to: 32768.0
            }
        );
        assert_eq!(s.growth_tracker, 0);
        // The count starts over: 1999 clean steps do not grow it yet.
        for _ in 0..1999 {
            assert_eq!(s.update(false), ScaleChange::Kept);
        }
        assert_eq!(s.scale, 32768.0);
    }

    #[test]
    fn two_thousand_clean_steps_double() {
        let mut s = LossScaler::default();
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(
            s.update(false),
            ScaleChange::Growth {
                from: 65536.0,
                to: 131072.0
            }
        );
        assert_eq!(s.growth_tracker, 0);
    }

    #[test]
    fn growth_stops_below_fp32_overflow() {
        let mut s = LossScaler {
            scale: 2f64.powi(127),
            growth_tracker: GROWTH_INTERVAL - 1,
        };
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(s.scale, 2f64.powi(127));
        assert_eq!(s.growth_tracker, 0);
    }

    #[test]
    fn repeated_overflows_keep_halving() {
        let mut s = LossScaler::default();
        for k in 1..=20 {
            s.update(true);
            assert_eq!(s.scale, 65536.0 / 2f64.powi(k));
        }
    }
}
