//! What a run leaves in its logs: classification metrics, the Trainer's metrics line,
//! TensorBoard event files and the plain progress lines.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bertft_cuda::train::metrics::{
    classification_metrics, format_metrics_line, python_float_repr, Metrics,
};
use bertft_cuda::train::progress::{format_log_line, Progress, Speed, StepStats};
use bertft_cuda::train::tensorboard::{crc32c, EventWriter};

mod common;
use common::tfevents::*;

// ---------------------------------------------------------------------------------------------
// Metrics

fn assert_metrics(got: Metrics, want: [f64; 5], case: &str) {
    let got_arr = [
        got.accuracy,
        got.f1,
        got.precision,
        got.recall,
        got.matthews_correlation,
    ];
    let names = [
        "accuracy",
        "f1",
        "precision",
        "recall",
        "matthews_correlation",
    ];
    for ((g, w), name) in got_arr.iter().zip(want).zip(names) {
        // Summation order may differ from numpy's by an ulp or so; nothing more.
        assert!((g - w).abs() < 1e-12, "{case}: {name} = {g}, want {w}");
    }
}

#[test]
fn binary_metrics_by_hand() {
    // Confusion (truth × prediction): tp = 4, fp = 2, fn = 2, tn = 2.
    let labels = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1];
    let preds = [1, 1, 0, 1, 0, 1, 0, 1, 1, 0];
    let m = classification_metrics(&preds, &labels, 2);
    // precision = recall = 4/6; MCC = (tp·tn − fp·fn)/√((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    //           = (8 − 4)/√(6·6·4·4) = 4/24.
    let mcc = 4.0 / 24.0;
    assert_metrics(
        m,
        [0.6, 4.0 / 6.0, 4.0 / 6.0, 4.0 / 6.0, mcc],
        "binary by hand",
    );
}

#[test]
fn macro_average_skips_classes_absent_on_both_sides() {
    // Class 3 is declared but never occurs: scikit-learn's macro mean is over 3 classes.
    let labels = [0, 1, 2, 2, 1, 0, 2, 1];
    let preds = [0, 2, 1, 2, 1, 0, 0, 2];
    let m = classification_metrics(&preds, &labels, 4);
    // Per class (precision, recall): 0: (2/3, 1), 1: (1/2, 1/3), 2: (1/3, 1/3).
    let precision = (2.0 / 3.0 + 0.5 + 1.0 / 3.0) / 3.0;
    let recall = (1.0 + 1.0 / 3.0 + 1.0 / 3.0) / 3.0;
    assert!((m.precision - precision).abs() < 1e-12, "{m:?}");
    assert!((m.recall - recall).abs() < 1e-12, "{m:?}");
}

/// Expected values are scikit-learn 1.9.1's outputs (accuracy_score, f1_score,
/// precision_score, recall_score with average="binary" for two labels and "macro"
/// otherwise, zero_division=0; matthews_corrcoef), hard-coded from their Python reprs.
#[test]
fn metrics_match_scikit_learn() {
    type Case = (
        &'static str,
        &'static [u32],
        &'static [u32],
        usize,
        [f64; 5],
    );
    let cases: [Case; 8] = [
        (
            "binary",
            &[1, 0, 1, 1, 0, 1, 0, 0, 1, 1],
            &[1, 1, 0, 1, 0, 1, 0, 1, 1, 0],
            2,
            [
                0.6,
                0.6666666666666666,
                0.6666666666666666,
                0.6666666666666666,
                0.16666666666666666,
            ],
        ),
        (
            "multi-class, a declared class never occurs",
            &[0, 1, 2, 2, 1, 0, 2, 1],
            &[0, 2, 1, 2, 1, 0, 0, 2],
            4,
            [
                0.5,
                0.5111111111111112,
                0.49999999999999994,
                0.5555555555555555,
                0.2619047619047619,
            ],
        ),
        (
            "multi-class, class 1 never predicted",
            &[0, 1, 2, 2, 1, 0, 2, 1, 2],
            &[0, 0, 2, 2, 0, 0, 2, 0, 2],
            3,
            [
                0.6666666666666666,
                0.5238095238095238,
                0.4666666666666666,
                0.6666666666666666,
                0.6139406135149205,
            ],
        ),
        (
            "multi-class, all correct",
            &[0, 1, 2, 1, 0],
            &[0, 1, 2, 1, 0],
            3,
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ),
        (
            "binary, all wrong",
            &[0, 1, 1, 0, 1],
            &[1, 0, 0, 1, 0],
            2,
            [0.0, 0.0, 0.0, 0.0, -1.0],
        ),
        (
            "multi-class, all wrong",
            &[0, 1, 2, 0],
            &[1, 2, 0, 2],
            3,
            [0.0, 0.0, 0.0, 0.0, -0.5],
        ),
        (
            "binary, no positives anywhere",
            &[0, 0, 0, 0],
            &[0, 0, 0, 0],
            2,
            [1.0, 0.0, 0.0, 0.0, 0.0],
        ),
        (
            "binary, constant prediction",
            &[1, 0, 1, 1],
            &[1, 1, 1, 1],
            2,
            [0.75, 0.8571428571428571, 0.75, 1.0, 0.0],
        ),
    ];
    for (name, labels, preds, num_labels, want) in cases {
        let got = classification_metrics(preds, labels, num_labels);
        assert_metrics(got, want, name);
    }
}

#[test]
fn floats_print_as_python_repr() {
    // Right-hand sides are Python 3.11's repr() of the same values.
    let cases = [
        (5e-05, "5e-05"),
        (0.1, "0.1"),
        (3.0, "3.0"),
        (1234567.0, "1234567.0"),
        (1e16, "1e+16"),
        (2.5e-07, "2.5e-07"),
        (0.0001, "0.0001"),
        (1234567890123456.0, "1234567890123456.0"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (-0.0, "-0.0"),
        (1e22, "1e+22"),
        (1.5e300, "1.5e+300"),
        (-2.5e-10, "-2.5e-10"),
        (1.0 / 3.0, "0.3333333333333333"),
        (100.0, "100.0"),
        (1e-320, "1e-320"),
        // Exactly halfway between two shortest candidates (sums exact in binary): Python
        // keeps the even digit.
        (1690060720831323.0 + 0.25, "1690060720831323.2"),
        (233115890514796.0 + 0.125, "233115890514796.12"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
        (f64::NAN, "nan"),
    ];
    for (value, want) in cases {
        assert_eq!(python_float_repr(value), want, "repr of {value:e}");
    }
}

#[test]
fn metrics_line_is_a_python_dict() {
    let entries = [
        ("epoch".to_string(), 1.0),
        ("eval_loss".to_string(), 0.5),
        ("eval_accuracy".to_string(), 0.82),
        ("learning_rate".to_string(), 5e-05),
    ];
    assert_eq!(
        format_metrics_line(&entries),
        "{'epoch': 1.0, 'eval_loss': 0.5, 'eval_accuracy': 0.82, 'learning_rate': 5e-05}"
    );
    assert_eq!(format_metrics_line(&[]), "{}");
}

// ---------------------------------------------------------------------------------------------
// TensorBoard event files, read back by a reader written independently of the writer

fn fresh_dir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("logs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn only_file(dir: &Path) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.into_iter().next().unwrap()
}

/// `events.out.tfevents.{unix_secs:010}.{hostname}.{pid}.{n}`; the host name may hold dots.
fn check_event_file_name(name: &str, created_after: f64) {
    let rest = name.strip_prefix("events.out.tfevents.").expect(name);
    let (secs, rest) = rest.split_once('.').expect(name);
    assert_eq!(secs.len(), 10, "{name}");
    let secs: f64 = secs.parse().expect(name);
    assert!(
        secs >= created_after.floor() && secs < created_after + 60.0,
        "{name}"
    );
    let mut tail = rest.rsplitn(3, '.');
    let (n, pid, host) = (
        tail.next().unwrap(),
        tail.next().expect(name),
        tail.next().expect(name),
    );
    n.parse::<u64>().expect(name);
    assert_eq!(pid, std::process::id().to_string(), "{name}");
    assert!(!host.is_empty(), "{name}");
}

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    assert_eq!(crc32c(&bytes), crc32c_bitwise(&bytes));
}

#[test]
fn event_file_round_trips_scalars() {
    let dir = fresh_dir("round-trip").join("nested/run");
    let scalars: [(&str, f32, i64); 5] = [
        ("train/loss", std::f32::consts::LN_2, 0),
        ("train/learning_rate", 4.75e-5, 50),
        ("eval/accuracy", 0.8125, 1_000_000_000_000),
        ("train/loss", f32::NAN, 7),
        ("odd step", -1.5, -3),
    ];
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let path = {
        let mut writer = EventWriter::create(&dir).unwrap();
        for (tag, value, step) in scalars {
            writer.add_scalar(tag, value, step).unwrap();
        }
        writer.flush().unwrap();
        writer.path().to_path_buf()
    };
    assert_eq!(only_file(&dir), path);
    let name = path.file_name().unwrap().to_str().unwrap();
    check_event_file_name(name, before);

    let events: Vec<Event> = read_records(&std::fs::read(&path).unwrap())
        .iter()
        .map(|r| decode_event(r))
        .collect();
    assert_eq!(events.len(), 1 + scalars.len());
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].scalars.is_empty());
    for (event, (tag, value, step)) in events[1..].iter().zip(scalars) {
        assert_eq!(event.step, step);
        assert_eq!(event.scalars.len(), 1);
        assert_eq!(event.scalars[0].0, tag);
        assert_eq!(event.scalars[0].1.to_bits(), value.to_bits(), "{tag}");
        assert!(event.file_version.is_none());
    }
    for event in &events {
        assert!(event.wall_time >= before - 1.0 && event.wall_time < before + 60.0);
    }
}

#[test]
fn writers_in_one_directory_get_distinct_files() {
    let dir = fresh_dir("two-writers");
    let a = EventWriter::create(&dir).unwrap();
    let b = EventWriter::create(&dir).unwrap();
    assert_ne!(a.path(), b.path());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
}

#[test]
fn create_names_the_path_on_failure() {
    let dir = fresh_dir("not-a-dir");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    std::fs::write(&dir, b"a file where the log directory should be").unwrap();
    let err = EventWriter::create(&dir)
        .err()
        .expect("creating under a file must fail");
    assert!(
        format!("{err:#}").contains(&dir.display().to_string()),
        "{err:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// Progress lines

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn log_line_format() {
    let stats = StepStats {
        // ln 2: the loss of an untrained binary classifier.
        loss: std::f64::consts::LN_2,
        lr: 4.75e-5,
        grad_norm: 1.234,
        epoch: 0.4,
    };
    let speed = Speed {
        samples_per_sec: 812.34,
        eta: Duration::from_secs(70),
    };
    assert_eq!(
        format_log_line(50, 1000, &stats, Some(speed)),
        "step 50/1000 (epoch 0.40): loss 0.6931, lr 4.75e-05, grad_norm 1.23, 812.3 samples/s, eta 0:01:10"
    );
    assert_eq!(
        format_log_line(0, 1000, &stats, None),
        "step 0/1000 (epoch 0.40): loss 0.6931, lr 4.75e-05, grad_norm 1.23, eta ?"
    );
}

#[test]
fn plain_progress_writes_one_line_per_logging_step() {
    let buf = SharedBuf::default();
    let mut progress = Progress::to_writer(1000, Box::new(buf.clone()));
    progress.log("***** Running training *****");
    for step in 1..=50 {
        progress.step(step, step * 8);
    }
    std::thread::sleep(Duration::from_millis(5));
    progress.update_stats(std::f64::consts::LN_2, 4.75e-5, 1.234, 0.4);
    progress.step(51, 408);
    progress.finish();
    progress.finish();

    let lines = buf.lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], "***** Running training *****");
    let prefix = "step 50/1000 (epoch 0.40): loss 0.6931, lr 4.75e-05, grad_norm 1.23, ";
    assert!(lines[1].starts_with(prefix), "{}", lines[1]);
    let rest = &lines[1][prefix.len()..];
    let (rate, eta) = rest.split_once(" samples/s, eta ").expect(rest);
    assert!(rate.parse::<f64>().unwrap() > 0.0, "{rate}");
    assert_eq!(eta.split(':').count(), 3, "{eta}");
    assert!(
        lines[2].starts_with("step 51/1000: done in 0:00:"),
        "{}",
        lines[2]
    );
}

#[test]
fn resumed_progress_times_only_new_steps() {
    let buf = SharedBuf::default();
    let mut progress = Progress::to_writer(100, Box::new(buf.clone())).resume_at(90, 720);
    assert!(progress.speed().is_none(), "nothing timed since resuming");
    std::thread::sleep(Duration::from_millis(20));
    progress.step(95, 760);
    let speed = progress.speed().unwrap();
    // 40 samples in ≥ 20 ms: at most 2000/s, whereas counting from 0 would claim 38000/s.
    assert!(speed.samples_per_sec <= 2000.0, "{speed:?}");
    // 5 steps left at the pace of 5 steps done: about as long again as has elapsed.
    assert!(speed.eta >= Duration::from_millis(20), "{speed:?}");
}

#[test]
fn terminal_progress_runs_without_a_terminal() {
    // indicatif hides the bar when stderr is not a terminal; the calls must still work.
    let mut progress = Progress::new(10, true);
    progress.step(1, 8);
    progress.update_stats(0.5, 1e-5, 0.3, 0.1);
    progress.log("a line above the bar");
    progress.finish();
}
