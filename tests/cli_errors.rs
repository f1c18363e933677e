//! Bad input: a one-line error naming the file (and line, column where they apply), a non-zero
//! exit, no panic, nothing written.

mod common;

use std::path::Path;

use common::cli::*;

/// `command` (train, evaluate or predict) on the CPU with `model`, reading `data` (and, for
/// train, writing `out`).
fn command_on(command: &str, model: &Path, data: &Path, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args([command, "--device", "cpu", "--model"]).arg(model);
    match command {
        "train" => c.arg("--train-file").arg(data).arg("--output-dir").arg(out),
        "evaluate" => c.arg("--validation-file").arg(data),
        _ => c.arg("--test-file").arg(data),
    };
    c
}

fn train_err(root: &Path, train: &Path, dev: Option<&Path>) -> String {
    let model = tiny_model_dir(root);
    let mut c = bin();
    c.args(["train", "--device", "cpu", "--max-steps", "1", "--model"])
        .arg(&model)
        .arg("--train-file")
        .arg(train);
    if let Some(d) = dev {
        c.arg("--validation-file").arg(d);
    }
    c.arg("--output-dir").arg(root.join("out"));
    run_err(&mut c)
}

#[test]
fn missing_column_lists_the_columns_present() {
    let root = scratch("err-column");
    let f = root.join("train.tsv");
    std::fs::write(&f, "phrase\tlabel\nw5 w6\ta\n").unwrap();
    let e = train_err(&root, &f, None);
    assert!(e.contains("train.tsv") && e.contains("phrase"), "{e}");
}

#[test]
fn empty_file() {
    let root = scratch("err-empty");
    let f = root.join("train.tsv");
    std::fs::write(&f, "").unwrap();
    let e = train_err(&root, &f, None);
    assert!(e.contains("train.tsv"), "{e}");
}

#[test]
fn malformed_row_names_its_line() {
    let root = scratch("err-row");
    let f = root.join("train.tsv");
    std::fs::write(&f, "sentence\tlabel\nw5 w6\ta\nw7\tb\textra\n").unwrap();
    let e = train_err(&root, &f, None);
    assert!(e.contains("train.tsv") && e.contains('3'), "{e}");
}

#[test]
fn invalid_utf8_names_its_line() {
    let root = scratch("err-utf8");
    let f = root.join("train.tsv");
    std::fs::write(&f, b"sentence\tlabel\nw5 \xff\xfe\ta\n").unwrap();
    let e = train_err(&root, &f, None);
    assert!(e.contains("train.tsv") && e.contains('2'), "{e}");
}

#[test]
fn unknown_label_at_evaluation() {
    let root = scratch("err-label");
    let (train, dev) = (root.join("train.tsv"), root.join("dev.tsv"));
    write_tsv(&train, &synthetic_rows(8, 1));
    std::fs::write(&dev, "sentence\tlabel\nw5\ta\nw6\tzzz\n").unwrap();
    let e = train_err(&root, &train, Some(&dev));
    assert!(e.contains("dev.tsv") && e.contains("zzz"), "{e}");
    assert!(!root.join("out").join("model.safetensors").exists());
}

#[test]
fn bad_json_lines() {
    let root = scratch("err-jsonl");
    let f = root.join("train.jsonl");
    std::fs::write(
        &f,
        "{\"sentence\": \"w5\", \"label\": \"a\"}\n{\"sentence\": \"w6\", \"label\": }\n",
    )
    .unwrap();
    let e = train_err(&root, &f, None);
    assert!(e.contains("train.jsonl") && e.contains('2'), "{e}");
}

#[test]
fn non_empty_output_dir_is_refused() {
    let root = scratch("err-outdir");
    let train = root.join("train.tsv");
    write_tsv(&train, &synthetic_rows(8, 1));
    std::fs::create_dir_all(root.join("out")).unwrap();
    std::fs::write(root.join("out").join("keep.txt"), "precious").unwrap();
    let e = train_err(&root, &train, None);
    assert!(e.contains("--overwrite-output-dir"), "{e}");
    assert_eq!(
        std::fs::read_to_string(root.join("out").join("keep.txt")).unwrap(),
        "precious"
    );
}

#[test]
fn missing_model_folder() {
    let root = scratch("err-model");
    let e = run_err(
        bin()
            .args(["predict", "--model"])
            .arg(root.join("nope"))
            .arg("--test-file")
            .arg(root.join("x.tsv")),
    );
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn texts_longer_than_the_maximum_are_truncated_not_refused() {
    let root = scratch("long-text");
    let model = tiny_model_dir(&root);
    let f = root.join("test.tsv");
    let long: Vec<String> = (0..500).map(|i| format!("w{}", 5 + i % 90)).collect();
    std::fs::write(&f, format!("sentence\n{}\n", long.join(" "))).unwrap();
    let out = run_ok(
        bin()
            .args(["predict", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--test-file")
            .arg(&f),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn device_cuda_without_a_gpu_is_a_one_line_error() {
    let has_gpu = bertft_cuda::backend::cuda::driver()
        .and_then(|d| d.gpus())
        .is_ok_and(|g| !g.is_empty());
    if has_gpu {
        // This checks the machine-without-GPU behaviour only.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"skipped: a CUDA device is present\n",
        );
        return;
    }
    let root = scratch("err-device");
    let model = tiny_model_dir(&root);
    let f = root.join("test.tsv");
    std::fs::write(&f, "sentence\nw5 w6\n").unwrap();
    let e = run_err(
        bin()
            .args(["predict", "--device", "cuda", "--model"])
            .arg(&model)
            .arg("--test-file")
            .arg(&f),
    );
    assert!(e.contains("--device cuda") && e.contains("driver"), "{e}");
    // auto falls back to the CPU, saying why.
    let out = run_ok(
        bin()
            .args(["predict", "--model"])
            .arg(&model)
            .arg("--test-file")
            .arg(&f),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("running on the CPU"));
}

#[test]
fn fp16_and_bf16_together_are_refused() {
    let root = scratch("err-fp16-bf16");
    let model = tiny_model_dir(&root);
    let f = root.join("dev.tsv");
    write_tsv(&f, &synthetic_rows(4, 1));
    let e =
        run_err(command_on("evaluate", &model, &f, &root.join("out")).args(["--fp16", "--bf16"]));
    assert!(e.contains("--fp16") && e.contains("--bf16"), "{e}");
}

#[test]
fn a_zero_token_budget_is_a_one_line_error_in_every_command() {
    let root = scratch("err-budget");
    let model = tiny_model_dir(&root);
    let f = root.join("data.tsv");
    write_tsv(&f, &synthetic_rows(8, 1));
    let budget = ["--max-tokens-per-batch", "0"];
    for command in ["train", "evaluate", "predict"] {
        let e = run_err(command_on(command, &model, &f, &root.join("out")).args(budget));
        assert!(e.contains("--max-tokens-per-batch"), "{command}: {e}");
    }
    assert!(!root.join("out").exists());

    let e = run_err(command_on("train", &model, &f, &root.join("out")).args([
        "--max-tokens-per-batch",
        "64",
        "--dataloader-drop-last",
    ]));
    assert!(
        e.contains("--max-tokens-per-batch") && e.contains("--dataloader-drop-last"),
        "{e}"
    );
}

#[test]
fn zero_batch_sizes_are_one_line_errors() {
    let root = scratch("err-zero-batch");
    let model = tiny_model_dir(&root);
    let f = root.join("data.tsv");
    write_tsv(&f, &synthetic_rows(8, 1));
    for (option, command) in [
        ("--per-device-train-batch-size", "train"),
        ("--gradient-accumulation-steps", "train"),
        ("--per-device-eval-batch-size", "train"),
        ("--per-device-eval-batch-size", "evaluate"),
    ] {
        let mut c = command_on(command, &model, &f, &root.join("out"));
        c.args([option, "0"]);
        let e = run_err(&mut c);
        assert!(e.contains(option), "{command} {option} 0: {e}");
    }
    assert!(!root.join("out").exists());
}
