//! `bertft-cuda bench` on the CPU: a tiny random-init model for two steps, the table's columns
//! and the JSON file; bad input gives a one-line error.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;

const COLUMNS: [&str; 11] = [
    "backend",
    "batch",
    "seq",
    "steps",
    "samples/s",
    "tokens/s",
    "ms/step median",
    "ms/step min",
    "TFLOP/s",
    "MFU",
    "peak mem",
];

/// A tiny BERT config (max 16 positions, 3 labels) in `root`.
fn tiny_config(root: &Path) -> PathBuf {
    let path = root.join("config.json");
    std::fs::write(
        &path,
        r#"{"vocab_size":40,"hidden_size":20,"num_attention_heads":4,"num_hidden_layers":2,
            "intermediate_size":33,"max_position_embeddings":16,"num_labels":3,"pad_token_id":0}"#,
    )
    .unwrap();
    path
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn bench_prints_a_row_per_batch_size_and_writes_json() {
    let root = scratch("bench-tiny");
    let config = tiny_config(&root);
    let json = root.join("bench.json");
    let out = run_ok(
        bin()
            .args(["bench", "--device", "cpu", "--config"])
            .arg(&config)
            .args(["--batch-size", "2,3", "--seq-len", "8", "--steps", "2"])
            .args(["--warmup-steps", "1", "--peak-tflops", "1", "--json"])
            .arg(&json),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(lines.len(), 4, "header, rule and two rows:\n{stdout}");
    assert_eq!(cells(lines[0]), COLUMNS, "{stdout}");
    for (line, batch) in lines[2..].iter().zip(["2", "3"]) {
        let row = cells(line);
        assert!(row[0].starts_with("cpu"), "{line}");
        assert_eq!(row[1..4], [batch, "8", "2"], "{line}");
        for number in &row[4..9] {
            let v: f64 = number.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(v > 0.0, "{line}");
        }
        assert!(row[9].ends_with('%'), "MFU against --peak-tflops: {line}");
        assert!(row[10].ends_with("iB"), "peak RSS: {line}");
    }

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["peak_tflops"], 1.0);
    // 2 layers · (4·20² + 2·20·33) weights in the per-token matmuls.
    assert_eq!(doc["matmul_parameters"], 2 * (4 * 400 + 2 * 20 * 33));
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, batch) in results.iter().zip([2, 3]) {
        assert_eq!(r["batch"], batch);
        assert_eq!(r["seq_len"], 8);
        assert_eq!(r["steps"], 2);
        assert_eq!(r["step_ms"].as_array().unwrap().len(), 2);
        // (6·N_matmul + 12·layers·hidden·seq) per token, batch·seq tokens.
        let per_token = 6 * 5840 + 12 * 2 * 20 * 8;
        assert_eq!(r["flops_per_step"], per_token * batch * 8);
        for key in [
            "samples_per_s",
            "tokens_per_s",
            "ms_per_step_median",
            "tflops",
            "mfu",
        ] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
        assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0);
        assert!(r["last_loss"].as_f64().unwrap().is_finite());
    }
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bench_a_model_folder_without_peak_prints_mfu_as_a_dash() {
    let root = scratch("bench-model");
    let model = tiny_model_dir(&root);
    let out = run_ok(
        bin()
            .args(["bench", "--device", "cpu", "--model"])
            .arg(&model)
            .args(["--batch-size", "2", "--seq-len", "4", "--steps", "1"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tiny-model"), "{stdout}");
    let row = stdout
        .lines()
        .filter(|l| l.starts_with('|'))
        .nth(2)
        .unwrap();
    assert_eq!(cells(row)[9], "-", "{stdout}");
}

#[test]
fn unknown_config_name_is_a_one_line_error() {
    let e = run_err(bin().args(["bench", "--device", "cpu", "--config", "bert-huge"]));
    assert!(
        e.contains("--config bert-huge") && e.contains("bert-base-uncased"),
        "{e}"
    );
}

#[test]
fn seq_len_over_max_positions_is_a_one_line_error() {
    let root = scratch("bench-seq");
    let config = tiny_config(&root);
    let e = run_err(
        bin()
            .args(["bench", "--device", "cpu", "--config"])
            .arg(&config)
            .args(["--seq-len", "17"]),
    );
    assert!(
        e.contains("--seq-len 17") && e.contains("max_position_embeddings (16)"),
        "{e}"
    );
}

#[test]
fn invalid_config_file_names_it() {
    let root = scratch("bench-bad-config");
    let config = root.join("config.json");
    std::fs::write(&config, "{not json").unwrap();
    let e = run_err(
        bin()
            .args(["bench", "--device", "cpu", "--config"])
            .arg(&config),
    );
    assert!(e.contains("config.json"), "{e}");
}
