//! Learning-rate schedules as transformers' `get_scheduler` computes them.
//!
//! Each is a multiplier of the base learning rate as a function of the number of optimizer
//! steps already taken (`LambdaLR`'s `last_epoch`), so step 0 of a warmup uses a rate of 0.
//! The rate of optimizer step `s` (0-based) is `base_lr · factor(s)`.

use std::f64::consts::PI;
use std::str::FromStr;

use anyhow::{bail, Error};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            "constant" => ScheduleKind::Constant,
            "constant_with_warmup" => ScheduleKind::ConstantWithWarmup,
            other => bail!("unknown lr scheduler type {other:?} (supported: linear, cosine, constant, constant_with_warmup)"),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The multiplier after `step` optimizer steps.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming = step < self.warmup_steps;
        let warmup = s / w.max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup if warming => warmup,
            ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear if warming => warmup,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine if warming => warmup,
            ScheduleKind::Cosine => {
                // num_cycles = 0.5: half a cosine from 1 down to 0.
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate optimizer step `step` (0-based) uses.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lrs(kind: ScheduleKind, warmup: u64, total: u64) -> Vec<f64> {
        let s = Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: warmup,
            total_steps: total,
        };
        (0..total).map(|i| s.lr(i)).collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .for_each(|(x, y)| assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}"));
    }

    // Expected values: transformers' get_scheduler (LambdaLR) with base lr 1, read from
    // optimizer.param_groups[0]["lr"] before each optimizer.step().
    #[test]
    fn linear_with_warmup_starts_at_zero() {
        close(
            &lrs(ScheduleKind::Linear, 2, 6),
            &[0.0, 0.5, 1.0, 0.75, 0.5, 0.25],
        );
        close(&lrs(ScheduleKind::Linear, 0, 4), &[1.0, 0.75, 0.5, 0.25]);
    }

    #[test]
    fn cosine_constant_and_constant_with_warmup() {
        let c = lrs(ScheduleKind::Cosine, 2, 6);
        close(&c[..3], &[0.0, 0.5, 1.0]);
        close(
            &c[3..],
            &[
                0.5 * (1.0 + (PI * 0.25).cos()),
                0.5,
                0.5 * (1.0 + (PI * 0.75).cos()),
            ],
        );
        close(&lrs(ScheduleKind::Constant, 2, 3), &[1.0, 1.0, 1.0]);
        close(
            &lrs(ScheduleKind::ConstantWithWarmup, 4, 6),
            &[0.0, 0.25, 0.5, 0.75, 1.0, 1.0],
        );
    }

    #[test]
    fn names_parse_as_transformers_spells_them() {
        assert_eq!(
            "constant_with_warmup".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::ConstantWithWarmup
        );
        assert!("polynomial"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .to_string()
            .contains("supported"));
    }
}
