//! The product's promise at small scale, on the CPU: all-MiniLM-L6-v2 fine-tuned through the
//! binary on the first 2,000 rows of SST-2's training set for one epoch, then evaluated on the
//! whole dev set (872 rows).
//!
//! Threshold: a fine-tuned MiniLM-L6 reaches ~91.5% on SST-2 with all 67k rows; with 2,000
//! rows and one epoch it reaches the low 80s (measured: see the assertion message in the log).
//! 0.78 leaves room for run-to-run noise across machines while failing on a broken trainer
//! (chance is 0.51).

mod common;

use common::cli::*;

#[test]
fn minilm_fine_tuned_on_2000_sst2_rows_beats_78_percent() {
    let root = scratch("sst2");
    let sst2 = common::sst2_dir();
    let text = std::fs::read_to_string(sst2.join("train.tsv")).unwrap();
    let subset: Vec<&str> = text.lines().take(2001).collect();
    let train = root.join("train.tsv");
    std::fs::write(&train, subset.join("\n") + "\n").unwrap();
    let out = root.join("out");
    let started = std::time::Instant::now();
    run_ok(
        bin()
            .args(["train", "--device", "cpu", "--model"])
            .arg(common::minilm_dir())
            .arg("--train-file")
            .arg(&train)
            .arg("--validation-file")
            .arg(sst2.join("dev.tsv"))
            .arg("--output-dir")
            .arg(&out)
            .args([
                "--num-train-epochs",
                "1",
                "--per-device-train-batch-size",
                "16",
                "--learning-rate",
                "1e-4",
            ])
            .args([
                "--warmup-steps",
                "0.1",
                "--weight-decay",
                "0.01",
                "--save-strategy",
                "no",
                "--logging-steps",
                "25",
            ]),
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    let accuracy = results["eval_accuracy"].as_f64().unwrap();
    eprintln!(
        "SST-2 dev accuracy {accuracy:.4} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(accuracy >= 0.78, "dev accuracy {accuracy:.4} < 0.78");
}
