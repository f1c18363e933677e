//! The progress bar, or plain log lines when the output is not a terminal.
//!
//! On a terminal a bar redrawn in place is the readable form; in a log file (a batch job, CI,
//! `2> train.log`) redraws would be noise, so there each logging step becomes one line:
//!
//! ```text
//! step 50/1000 (epoch 0.40): loss 0.6931, lr 4.75e-05, grad_norm 1.23, 812.3 samples/s, eta 0:01:10
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The training statistics of the latest logging step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f32,
    pub epoch: f64,
}

/// Throughput since the reporter started, once at least one step has been timed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speed {
    pub samples_per_sec: f64,
    pub eta: Duration,
}

pub struct Progress {
    total_steps: u64,
    sink: Sink,
    start: Instant,
    /// Step and sample count at `start`: a resumed run measures speed from where it resumed.
    base_step: u64,
    base_samples: u64,
    step: u64,
    samples_done: u64,
    stats: Option<StepStats>,
    finished: bool,
}

enum Sink {
    Bar(ProgressBar),
    Lines(Box<dyn Write + Send>),
}

impl Progress {
    /// A bar on stderr when `to_terminal` (the caller passes `stderr().is_terminal()`), plain
    /// lines on stderr otherwise.
    pub fn new(total_steps: u64, to_terminal: bool) -> Self {
        if to_terminal {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            bar.set_style(bar_style());
            Self::with_sink(total_steps, Sink::Bar(bar))
        } else {
            Self::to_writer(total_steps, Box::new(std::io::stderr()))
        }
    }

    /// Plain lines to `out`.
    pub fn to_writer(total_steps: u64, out: Box<dyn Write + Send>) -> Self {
        Self::with_sink(total_steps, Sink::Lines(out))
    }

    fn with_sink(total_steps: u64, sink: Sink) -> Self {
        Progress {
            total_steps,
            sink,
            start: Instant::now(),
            base_step: 0,
            base_samples: 0,
            step: 0,
            samples_done: 0,
            stats: None,
            finished: false,
        }
    }

    /// Starts the count at `step` with `samples_done` samples behind it (a resumed run), so
    /// that speed and ETA cover only the work done from here.
    pub fn resume_at(mut self, step: u64, samples_done: u64) -> Self {
        self.start = Instant::now();
        (self.base_step, self.base_samples) = (step, samples_done);
        (self.step, self.samples_done) = (step, samples_done);
        if let Sink::Bar(bar) = &self.sink {
            bar.set_position(step);
            bar.reset_eta();
        }
        self
    }

    /// Records that `step` optimizer steps and `samples_done` samples are done.
    pub fn step(&mut self, step: u64, samples_done: u64) {
        self.step = step;
        self.samples_done = samples_done;
        if let Sink::Bar(bar) = &self.sink {
            bar.set_position(step);
            bar.set_message(self.bar_message());
        }
    }

    /// Prints `line` (above the bar, if there is one).
    pub fn log(&mut self, line: &str) {
        match &mut self.sink {
            Sink::Bar(bar) => bar.println(line),
            Sink::Lines(out) => write_line(out, line),
        }
    }

    /// Takes the statistics of a logging step; without a bar, prints its line.
    pub fn update_stats(&mut self, loss: f64, lr: f64, grad_norm: f32, epoch: f64) {
        let stats = StepStats {
            loss,
            lr,
            grad_norm,
            epoch,
        };
        self.stats = Some(stats);
        let speed = self.speed();
        match &mut self.sink {
            Sink::Bar(bar) => bar.set_message(format_stats(Some(&stats), speed)),
            Sink::Lines(out) => {
                let line = format_log_line(self.step, self.total_steps, &stats, speed);
                write_line(out, &line);
            }
        }
    }

    /// Ends the report: leaves the bar drawn at its final state, or prints a closing line.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.start.elapsed();
        match &mut self.sink {
            Sink::Bar(bar) => bar.finish(),
            Sink::Lines(out) => {
                let line = format!(
                    "step {}/{}: done in {}",
                    self.step,
                    self.total_steps,
                    format_duration(elapsed)
                );
                write_line(out, &line);
            }
        }
    }

    /// Samples per second and time left, from the steps done since the start.
    pub fn speed(&self) -> Option<Speed> {
        speed(
            self.start.elapsed(),
            self.step.saturating_sub(self.base_step),
            self.samples_done.saturating_sub(self.base_samples),
            self.total_steps.saturating_sub(self.step),
        )
    }

    fn bar_message(&self) -> String {
        format_stats(self.stats.as_ref(), self.speed())
    }
}

/// Progress is a side channel: a closed or full stderr must not abort training.
fn write_line(out: &mut Box<dyn Write + Send>, line: &str) {
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}] {msg}")
        .expect("the bar template is a valid indicatif template")
        .progress_chars("=> ")
}

/// Throughput after `steps_done` steps and `samples_done` samples in `elapsed`, with
/// `steps_left` to go; `None` until something has been timed.
pub fn speed(
    elapsed: Duration,
    steps_done: u64,
    samples_done: u64,
    steps_left: u64,
) -> Option<Speed> {
    let secs = elapsed.as_secs_f64();
    if steps_done == 0 || secs <= 0.0 {
        return None;
    }
    Some(Speed {
        samples_per_sec: samples_done as f64 / secs,
        eta: Duration::from_secs_f64(secs * steps_left as f64 / steps_done as f64),
    })
}

/// The plain log line of one logging step.
pub fn format_log_line(step: u64, total: u64, stats: &StepStats, speed: Option<Speed>) -> String {
    format!(
        "step {step}/{total} (epoch {}): {}",
        fixed(stats.epoch, 2),
        format_stats(Some(stats), speed)
    )
}

/// `loss …, lr …, grad_norm …, … samples/s, eta …`, leaving out what is not known yet.
fn format_stats(stats: Option<&StepStats>, speed: Option<Speed>) -> String {
    let mut parts = Vec::new();
    if let Some(s) = stats {
        parts.push(format!("loss {}", fixed(s.loss, 4)));
        parts.push(format!("lr {}", scientific(s.lr, 2)));
        parts.push(format!("grad_norm {}", fixed(s.grad_norm as f64, 2)));
    }
    match speed {
        Some(sp) => {
            parts.push(format!("{} samples/s", fixed(sp.samples_per_sec, 1)));
            parts.push(format!("eta {}", format_duration(sp.eta)));
        }
        None => parts.push("eta ?".into()),
    }
    parts.join(", ")
}

/// `H:MM:SS`, rounded to the second, as Python's `str(timedelta)` prints whole seconds.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Python's `f"{x:.{prec}f}"`: Rust's layout, but `nan`/`inf` spelled as Python does.
fn fixed(x: f64, prec: usize) -> String {
    non_finite(x).unwrap_or_else(|| format!("{x:.prec$}"))
}

/// Python's `f"{x:.{prec}e}"`: the exponent signed and at least two digits (`4.75e-05`).
fn scientific(x: f64, prec: usize) -> String {
    if let Some(s) = non_finite(x) {
        return s;
    }
    let s = format!("{x:.prec$e}");
    let (mantissa, exp) = s.split_once('e').expect("`{:e}` always writes an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes an integer exponent");
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

fn non_finite(x: f64) -> Option<String> {
    let s = if x.is_nan() {
        "nan"
    } else if x.is_infinite() {
        if x > 0.0 {
            "inf"
        } else {
            "-inf"
        }
    } else {
        return None;
    };
    Some(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scientific_matches_python() {
        // Python: f"{4.75e-05:.2e}", f"{0.0:.2e}", f"{123.0:.2e}", f"{1e-100:.2e}"
        assert_eq!(scientific(4.75e-5, 2), "4.75e-05");
        assert_eq!(scientific(0.0, 2), "0.00e+00");
        assert_eq!(scientific(123.0, 2), "1.23e+02");
        assert_eq!(scientific(1e-100, 2), "1.00e-100");
        assert_eq!(scientific(f64::NAN, 2), "nan");
    }

    #[test]
    fn fixed_spells_non_finite_like_python() {
        assert_eq!(fixed(0.123456, 4), "0.1235");
        assert_eq!(fixed(f64::INFINITY, 4), "inf");
        assert_eq!(fixed(f64::NEG_INFINITY, 4), "-inf");
    }

    #[test]
    fn durations_round_to_seconds() {
        assert_eq!(format_duration(Duration::from_millis(70_400)), "0:01:10");
        assert_eq!(format_duration(Duration::from_millis(3_599_600)), "1:00:00");
        assert_eq!(
            format_duration(Duration::from_secs(100 * 3600 + 61)),
            "100:01:01"
        );
    }

    #[test]
    fn speed_needs_a_timed_step() {
        assert_eq!(speed(Duration::from_secs(1), 0, 0, 10), None);
        assert_eq!(speed(Duration::ZERO, 5, 40, 10), None);
        let s = speed(Duration::from_secs(10), 50, 400, 950).unwrap();
        assert_eq!(s.samples_per_sec, 40.0);
        assert_eq!(s.eta, Duration::from_secs(190));
    }
}
