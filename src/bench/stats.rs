//! What a benchmark setting measured, and the rates derived from it.
//!
//! Rates are over the whole timed run (`steps · batch / Σ step times`), so a slow outlier step
//! counts as it does for a real training run; the median and minimum step times are reported
//! beside them. `benches/hf_reference.py` derives its columns the same way.

use std::time::Duration;

/// One benchmark setting: `batch` sequences of `seq_len` tokens per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub batch: usize,
    pub seq_len: usize,
    pub warmup_steps: usize,
    pub steps: usize,
}

/// The timed steps of one setting and what else was read during it.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub setting: Setting,
    /// Wall-clock time of each timed step, in order: the steps are queued without waiting for
    /// the device, and these are the gaps between the host's returns from queueing them, the
    /// last one ending when every step has finished (see `bench::measure`). They add up to the
    /// timed window.
    pub step_times: Vec<Duration>,
    /// Model FLOPs of one step (`model::flops`).
    pub flops_per_step: u64,
    pub peak_memory_bytes: Option<u64>,
    /// The mean loss of the last step (a NaN here means the numbers are not worth comparing).
    pub last_loss: f64,
}

impl Measurement {
    pub fn total_seconds(&self) -> f64 {
        self.step_times.iter().map(Duration::as_secs_f64).sum()
    }

    pub fn samples_per_second(&self) -> f64 {
        (self.setting.batch * self.step_times.len()) as f64 / self.total_seconds()
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.samples_per_second() * self.setting.seq_len as f64
    }

    pub fn median_ms(&self) -> f64 {
        median(&self.step_times).as_secs_f64() * 1e3
    }

    pub fn min_ms(&self) -> f64 {
        self.step_times
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    }

    /// Model TFLOP/s achieved over the timed steps.
    pub fn tflops(&self) -> f64 {
        self.flops_per_step as f64 * self.step_times.len() as f64 / self.total_seconds() / 1e12
    }

    /// Model FLOPs utilization: achieved over peak FLOP/s, as a fraction.
    pub fn mfu(&self, peak_tflops: Option<f64>) -> Option<f64> {
        peak_tflops.map(|peak| self.tflops() / peak)
    }
}

/// The middle value (the mean of the middle two for an even count); zero for none.
pub fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    match n {
        0 => Duration::ZERO,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&ms(&[30, 10, 20])), Duration::from_millis(20));
        assert_eq!(median(&ms(&[40, 10, 20, 30])), Duration::from_millis(25));
        assert_eq!(median(&[]), Duration::ZERO);
    }

    #[test]
    fn rates_are_over_the_whole_timed_run() {
        let m = Measurement {
            setting: Setting {
                batch: 4,
                seq_len: 8,
                warmup_steps: 1,
                steps: 4,
            },
            step_times: ms(&[100, 200, 100, 100]),
            flops_per_step: 2_000_000_000_000,
            peak_memory_bytes: None,
            last_loss: 0.7,
        };
        // 16 samples in 0.5 s.
        assert!((m.samples_per_second() - 32.0).abs() < 1e-9);
        assert!((m.tokens_per_second() - 256.0).abs() < 1e-9);
        assert!((m.median_ms() - 100.0).abs() < 1e-9);
        assert!((m.min_ms() - 100.0).abs() < 1e-9);
        // 4 steps of 2 TFLOP in 0.5 s.
        assert!((m.tflops() - 16.0).abs() < 1e-9);
        assert!((m.mfu(Some(64.0)).unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(m.mfu(None), None);
    }
}
