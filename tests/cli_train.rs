//! End to end through the binary on a tiny model: train → evaluate → predict → resume.

mod common;

use std::path::Path;
use std::process::Command;

use common::cli::*;
use serde_json::Value;

fn read_json(path: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

struct Setup {
    model: std::path::PathBuf,
    train: std::path::PathBuf,
    dev: std::path::PathBuf,
}

fn setup(root: &Path) -> Setup {
    let model = tiny_model_dir(root);
    let (train, dev) = (root.join("train.tsv"), root.join("dev.tsv"));
    write_tsv(&train, &synthetic_rows(96, 1));
    write_tsv(&dev, &synthetic_rows(30, 2));
    Setup { model, train, dev }
}

fn train_cmd(s: &Setup, out: &Path) -> Command {
    let mut c = bin();
    c.args(["train", "--device", "cpu", "--model"])
        .arg(&s.model);
    c.arg("--train-file")
        .arg(&s.train)
        .arg("--validation-file")
        .arg(&s.dev)
        .arg("--output-dir")
        .arg(out);
    c.args([
        "--per-device-train-batch-size",
        "8",
        "--learning-rate",
        "5e-3",
        "--seed",
        "7",
        "--logging-steps",
        "5",
    ]);
    c
}

#[test]
fn train_evaluate_predict_end_to_end() {
    let root = scratch("e2e");
    let s = setup(&root);
    let out = root.join("out");
    let train_out = run_ok(train_cmd(&s, &out).args([
        "--num-train-epochs",
        "10",
        "--eval-strategy",
        "epoch",
        "--save-steps",
        "10",
        "--save-total-limit",
        "2",
        "--warmup-steps",
        "0.1",
        "--weight-decay",
        "0.01",
    ]));
    let stdout = String::from_utf8_lossy(&train_out.stdout);
    assert!(
        stdout.lines().last().unwrap().starts_with("{'eval_loss': "),
        "{stdout}"
    );

    // 96 rows / batch 8 = 12 steps per epoch, 10 epochs; warmup ceil(0.1·120) = 12 steps.
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 120);
    assert_eq!(state["max_steps"], 120);
    assert_eq!(state["epoch"].as_f64(), Some(10.0));
    let history = state["log_history"].as_array().unwrap();
    let train_logs: Vec<&Value> = history.iter().filter(|e| e.get("loss").is_some()).collect();
    let logged: Vec<u64> = train_logs
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=24).map(|k| 5 * k).collect::<Vec<u64>>());
    for e in &train_logs {
        for k in ["loss", "grad_norm", "learning_rate", "epoch", "step"] {
            assert!(e.get(k).is_some(), "log entry without {k}: {e}");
        }
    }
    // The rate logged for a step is the one that step used: step 5 follows 4 steps of a
    // 12-step warmup (5e-3 · 4/12); step 20 is 19 steps in, 7 into the linear decay
    // (5e-3 · (120 − 19)/(120 − 12)).
    assert!((train_logs[0]["learning_rate"].as_f64().unwrap() - 5e-3 * 4.0 / 12.0).abs() < 1e-12);
    assert!(
        (train_logs[3]["learning_rate"].as_f64().unwrap() - 5e-3 * 101.0 / 108.0).abs() < 1e-12
    );
    assert!((train_logs[0]["epoch"].as_f64().unwrap() - 5.0 / 12.0).abs() < 1e-9);
    let evals: Vec<&Value> = history
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    let evaluated: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(evaluated, (1..=10).map(|k| 12 * k).collect::<Vec<u64>>());
    for k in [
        "eval_accuracy",
        "eval_f1",
        "eval_precision",
        "eval_recall",
        "eval_matthews_correlation",
        "eval_runtime",
    ] {
        assert!(evals[0].get(k).is_some(), "no {k}");
    }
    let first_acc = evals[0]["eval_accuracy"].as_f64().unwrap();
    let last_acc = evals[9]["eval_accuracy"].as_f64().unwrap();
    // Chance is 1/3; the rule is easy once learnt (it reaches 1.0 here).
    assert!(
        last_acc >= 0.9 && last_acc > first_acc,
        "the tiny model did not learn: {first_acc} → {last_acc}"
    );
    assert!(history.last().unwrap().get("train_loss").is_some());

    // Saved every 10 steps and at the end; the limit keeps the newest two.
    let mut checkpoints: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    checkpoints.sort();
    assert_eq!(checkpoints, ["checkpoint-110", "checkpoint-120"]);
    for f in [
        "model.safetensors",
        "config.json",
        "vocab.txt",
        "trainer_state.json",
        "train_results.json",
        "eval_results.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["id2label"]["2"], "c");
    let eval_results = read_json(&out.join("eval_results.json"));
    assert_eq!(eval_results["eval_accuracy"].as_f64(), Some(last_acc));

    // evaluate: the same metrics from the saved model.
    let ev = run_ok(
        bin()
            .args(["evaluate", "--device", "cpu", "--model"])
            .arg(&out)
            .arg("--validation-file")
            .arg(&s.dev),
    );
    let line = String::from_utf8_lossy(&ev.stdout).to_string();
    assert!(
        line.contains(&format!("'eval_accuracy': {last_acc}")),
        "{line} vs {last_acc}"
    );

    // predict: one JSON object per row, in order.
    let preds = root.join("preds.jsonl");
    run_ok(
        bin()
            .args(["predict", "--device", "cpu", "--model"])
            .arg(&out)
            .arg("--test-file")
            .arg(&s.dev)
            .arg("--output")
            .arg(&preds),
    );
    let rows: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 30);
    let expected = synthetic_rows(30, 2);
    let correct = rows
        .iter()
        .zip(&expected)
        .filter(|(r, (_, l))| r["label"] == *l)
        .count() as f64
        / 30.0;
    assert!(
        (correct - last_acc).abs() < 1e-9,
        "predict and evaluate disagree"
    );
    for r in &rows {
        let probs: Vec<f64> = r["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        assert_eq!(r["logits"].as_array().unwrap().len(), 3);
        assert_eq!(
            r["score"].as_f64().unwrap(),
            probs[r["label_id"].as_u64().unwrap() as usize]
        );
    }
}

/// Trains 8 steps saving every 4, then resumes a copy of checkpoint-4 to step 8: the weights
/// must be byte-identical. Returns the resumed run's output folder.
fn resume_matches_uninterrupted(name: &str, extra: &[&str]) -> std::path::PathBuf {
    let root = scratch(name);
    let s = setup(&root);
    let args = [
        "--max-steps",
        "8",
        "--save-steps",
        "4",
        "--gradient-accumulation-steps",
        "2",
    ];
    let full = root.join("full");
    run_ok(train_cmd(&s, &full).args(args).args(extra));
    // A second run that only has the step-4 checkpoint, as if it had stopped there.
    let resumed = root.join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let from = full.join("checkpoint-4");
    let to = resumed.join("checkpoint-4");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    run_ok(
        train_cmd(&s, &resumed)
            .args(args)
            .args(extra)
            .args(["--resume-from-checkpoint", "true"]),
    );
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "{name}: the resumed run's weights differ from the uninterrupted run's"
    );
    let state = read_json(&resumed.join("trainer_state.json"));
    assert_eq!(state["global_step"], 8);
    resumed
}

#[test]
fn resume_reproduces_an_uninterrupted_run_bit_for_bit() {
    let resumed = resume_matches_uninterrupted("resume", &[]);
    assert!(!resumed.join("checkpoint-8/scaler.json").exists());
}

#[test]
fn fp16_runs_save_and_resume_their_loss_scaler() {
    // --fp16 on the CPU emulates the GPU's fp16 GEMM operands, with dynamic loss scaling.
    let resumed = resume_matches_uninterrupted("resume-fp16", &["--fp16"]);
    // Restored at step 4 (4 clean steps), then 4 more: a fresh scaler would say 4.
    let scaler = read_json(&resumed.join("checkpoint-8/scaler.json"));
    assert_eq!(scaler["scale"], 65536.0);
    assert_eq!(scaler["growth_tracker"], 8);
}

#[test]
fn args_file_is_read_and_the_command_line_wins() {
    let root = scratch("argsfile");
    let s = setup(&root);
    let out = root.join("out");
    let args = root.join("args.json");
    std::fs::write(
        &args,
        r#"{"max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no"}"#,
    )
    .unwrap();
    run_ok(
        train_cmd(&s, &out)
            .arg("--args-file")
            .arg(&args)
            .args(["--max-steps", "2"]),
    );
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 2);
    assert!(!out.join("checkpoint-2").exists());
}

#[test]
fn best_model_tracking_and_early_stopping() {
    let root = scratch("best");
    let s = setup(&root);
    let out = root.join("out");
    run_ok(train_cmd(&s, &out).args([
        "--num-train-epochs",
        "30",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "12",
        "--save-steps",
        "12",
        "--save-total-limit",
        "1",
        "--metric-for-best-model",
        "accuracy",
        "--load-best-model-at-end",
        "--early-stopping-patience",
        "2",
        "--report-to",
        "tensorboard",
    ]));
    let state = read_json(&out.join("trainer_state.json"));
    let evals: Vec<(u64, f64)> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("eval_accuracy").is_some())
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["eval_accuracy"].as_f64().unwrap(),
            )
        })
        .collect();
    // Stopped early: two evaluations without improvement after the best, far before 360 steps.
    let global = state["global_step"].as_u64().unwrap();
    assert!(global < 360, "no early stop: {global} steps");
    let best = evals.iter().map(|e| e.1).fold(f64::MIN, f64::max);
    let best_step = evals.iter().find(|e| e.1 == best).unwrap().0;
    assert_eq!(evals.last().unwrap().0, best_step + 24, "{evals:?}");
    assert_eq!(state["best_metric"].as_f64(), Some(best));
    assert_eq!(state["best_global_step"].as_u64(), Some(best_step));
    let best_dir = state["best_model_checkpoint"].as_str().unwrap();
    assert!(
        best_dir.ends_with(&format!("checkpoint-{best_step}")),
        "{best_dir}"
    );
    // The limit keeps the newest checkpoint and, besides it, the best.
    assert!(Path::new(best_dir).is_dir());
    assert!(out.join(format!("checkpoint-{global}")).is_dir());
    // The final model is the best one: its accuracy is the best accuracy.
    let eval_results = read_json(&out.join("eval_results.json"));
    assert_eq!(eval_results["eval_accuracy"].as_f64(), Some(best));

    // TensorBoard events under the logging dir, readable, with the Trainer's tags.
    let runs = out.join("runs");
    let event_file = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .expect("an event file");
    let records = common::tfevents::read_records(&std::fs::read(event_file).unwrap());
    let tags: Vec<String> = records
        .iter()
        .skip(1)
        .flat_map(|r| {
            common::tfevents::decode_event(r)
                .scalars
                .into_iter()
                .map(|(t, _)| t)
        })
        .collect();
    for t in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "eval/accuracy",
        "eval/loss",
    ] {
        assert!(tags.iter().any(|x| x == t), "no {t} in {tags:?}");
    }
    assert!(runs.join("log.jsonl").is_file());
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_then_exits() {
    let root = scratch("ctrlc");
    let s = setup(&root);
    let out = root.join("out");
    let child = train_cmd(&s, &out)
        .args([
            "--max-steps",
            "1000000",
            "--save-strategy",
            "no",
            "--logging-steps",
            "100000",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let kill = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .unwrap();
    assert!(kill.success());
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .last()
            .unwrap()
            .contains("interrupted at step"),
        "{stderr}"
    );
    let checkpoint = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .expect("a checkpoint");
    let state = read_json(&checkpoint.join("trainer_state.json"));
    let step = state["global_step"].as_u64().unwrap();
    assert!(checkpoint.ends_with(format!("checkpoint-{step}")) && step > 0);
    // It resumes.
    run_ok(train_cmd(&s, &out).args([
        "--max-steps",
        &(step + 2).to_string(),
        "--resume-from-checkpoint",
        "true",
    ]));
    assert_eq!(
        read_json(&out.join("trainer_state.json"))["global_step"].as_u64(),
        Some(step + 2)
    );
}

/// Token counts of `synthetic_rows`: one per word, plus [CLS] and [SEP].
fn synthetic_lengths(rows: &[(String, &str)]) -> Vec<usize> {
    rows.iter().map(|(s, _)| s.split(' ').count() + 2).collect()
}

/// The budget batching, written out again: consecutive rows while they fit in `max_tokens`
/// and `max_rows`, a row longer than the budget alone.
fn budget_micro_batches(
    order: &[usize],
    lengths: &[usize],
    max_tokens: usize,
    max_rows: usize,
) -> usize {
    let (mut count, mut rows, mut tokens) = (0, 0, 0);
    for &i in order {
        if rows > 0 && (rows == max_rows || tokens + lengths[i] > max_tokens) {
            (rows, tokens) = (0, 0);
        }
        if rows == 0 {
            count += 1;
        }
        rows += 1;
        tokens += lengths[i];
    }
    count
}

fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn token_budget_batches_plan_the_run_and_resume_bit_for_bit() {
    let root = scratch("budget");
    let s = setup(&root);
    let budget = [
        "--max-tokens-per-batch",
        "40",
        "--gradient-accumulation-steps",
        "2",
        "--num-train-epochs",
        "2.5",
        "--save-steps",
        "5",
    ];
    let full = root.join("full");
    run_ok(train_cmd(&s, &full).args(budget));

    // Each shuffled epoch (data seed = seed 7) cut by 40 tokens and at most 8 rows (the
    // per-device batch size), 2 micro-batches a step: two whole epochs, then half the third's.
    let lengths = synthetic_lengths(&synthetic_rows(96, 1));
    let micro: Vec<usize> = (0..3)
        .map(|e| {
            let order = bertft_cuda::data::sampler::permutation(96, 7, e);
            budget_micro_batches(&order, &lengths, 40, 8)
        })
        .collect();
    let steps: Vec<u64> = micro.iter().map(|&m| m.div_ceil(2) as u64).collect();
    let max_steps = steps[0] + steps[1] + steps[2].div_ceil(2);
    // More steps than fixed batches of 8 would make (12 micro-batches, 6 steps an epoch).
    assert!(steps[0] > 6, "{steps:?}");
    let state = read_json(&full.join("trainer_state.json"));
    assert_eq!(state["max_steps"].as_u64(), Some(max_steps), "{steps:?}");
    assert_eq!(state["global_step"].as_u64(), Some(max_steps));
    assert_eq!(state["num_train_epochs"].as_u64(), Some(3));
    let last_micro = (steps[2].div_ceil(2) as usize * 2).min(micro[2]);
    let epoch = 2.0 + last_micro as f64 / micro[2] as f64;
    assert!((state["epoch"].as_f64().unwrap() - epoch).abs() < 1e-9);

    // Resumed from a checkpoint in the second epoch, whose batches are recomputed and skipped.
    let at = (steps[0] / 5 + 1) * 5;
    assert!(at < steps[0] + steps[1], "{at} is not in the second epoch");
    let resumed = root.join("resumed");
    let name = format!("checkpoint-{at}");
    copy_checkpoint(&full.join(&name), &resumed.join(&name));
    run_ok(
        train_cmd(&s, &resumed)
            .args(budget)
            .args(["--resume-from-checkpoint", "true"]),
    );
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed run's weights differ from the uninterrupted run's"
    );
    let state = read_json(&resumed.join("trainer_state.json"));
    assert_eq!(state["global_step"].as_u64(), Some(max_steps));
}

#[test]
fn token_budget_predictions_and_metrics_match_row_batches_in_input_order() {
    let root = scratch("budget-predict");
    let s = setup(&root);
    let predict_with = |options: &[&str], name: &str| -> Vec<Value> {
        let out = root.join(name);
        run_ok(
            bin()
                .args(["predict", "--device", "cpu", "--model"])
                .arg(&s.model)
                .arg("--test-file")
                .arg(&s.dev)
                .arg("--output")
                .arg(&out)
                .args(options),
        );
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let by_rows = predict_with(&[], "rows.jsonl");
    let by_budget = predict_with(&["--max-tokens-per-batch", "20"], "budget.jsonl");
    assert_eq!(by_budget.len(), 30);
    for (r, (a, b)) in by_budget.iter().zip(&by_rows).enumerate() {
        let logits = |v: &Value| -> Vec<f64> {
            v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (la, lb) = (logits(a), logits(b));
        assert!(
            la.iter().zip(&lb).all(|(x, y)| (x - y).abs() < 1e-5),
            "row {r}: {la:?} vs {lb:?}"
        );
    }

    let evaluate_with = |options: &[&str]| -> String {
        let out = run_ok(
            bin()
                .args(["evaluate", "--device", "cpu", "--model"])
                .arg(&s.model)
                .arg("--validation-file")
                .arg(&s.dev)
                .args(options),
        );
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        let accuracy = line.split("'eval_accuracy': ").nth(1).unwrap();
        accuracy.split(',').next().unwrap().to_string()
    };
    assert_eq!(
        evaluate_with(&["--max-tokens-per-batch", "20"]),
        evaluate_with(&[])
    );
}

/// The loss logged every 3 steps is the mean of the 3 per-step losses logged every step, and
/// `train_loss` is the same: the queued steps' losses are read back whole, whenever the
/// trainer reads them.
#[test]
fn logged_losses_are_the_means_of_the_steps_since_the_last_log() {
    let root = scratch("log-means");
    let s = setup(&root);
    let run = |name: &str, every: &str| {
        let out = root.join(name);
        run_ok(train_cmd(&s, &out).args(["--max-steps", "9", "--logging-steps", every]));
        let state = read_json(&out.join("trainer_state.json"));
        let losses: Vec<f64> = state["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("loss").and_then(Value::as_f64))
            .collect();
        let results = read_json(&out.join("train_results.json"));
        (losses, results["train_loss"].as_f64().unwrap())
    };
    let (each, train_loss_each) = run("every-step", "1");
    let (thirds, train_loss_thirds) = run("every-third", "3");
    assert_eq!((each.len(), thirds.len()), (9, 3));
    for (k, logged) in thirds.iter().enumerate() {
        let mean = each[3 * k..3 * k + 3].iter().sum::<f64>() / 3.0;
        // Both sides are rounded to 4 decimals when logged, as the Trainer rounds them.
        assert!((logged - mean).abs() <= 1e-4, "log {k}: {logged} vs {mean}");
    }
    assert_eq!(train_loss_each, train_loss_thirds);
    let mean_all = each.iter().sum::<f64>() / 9.0;
    assert!((train_loss_each - mean_all).abs() <= 1e-4);
}

#[test]
fn cuda_graphs_are_ignored_on_the_cpu_with_a_notice() {
    let root = scratch("graphs-cpu");
    let s = setup(&root);
    let (plain, graphs) = (root.join("plain"), root.join("graphs"));
    run_ok(train_cmd(&s, &plain).args(["--num-train-epochs", "1"]));
    let out = run_ok(train_cmd(&s, &graphs).args(["--num-train-epochs", "1", "--cuda-graphs"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("notice: --cuda-graphs is ignored on the CPU"),
        "{stderr}"
    );
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        weights(&plain) == weights(&graphs),
        "the same run either way"
    );
}

/// Batches padded to their buckets (dummy sequences whose loss is ignored, padding rows spread
/// over them: what CUDA graphs need, forced here on the CPU by `BERTFT_BUCKET_PADDING=1`) train,
/// log, evaluate and predict as the unpadded batches do: the trainer's means count the real
/// sequences only, and the dummies' losses and predictions are dropped. Token-budget batches,
/// so that the sequence count varies, with gradient accumulation.
#[test]
fn bucket_padded_runs_match_unpadded_runs() {
    let root = scratch("bucket-padding");
    let s = setup(&root);
    let run = |name: &str, padded: bool| {
        let out = root.join(name);
        let mut cmd = train_cmd(&s, &out);
        cmd.args([
            "--max-tokens-per-batch",
            "60",
            "--gradient-accumulation-steps",
            "2",
            "--num-train-epochs",
            "2",
            "--logging-steps",
            "1",
            "--eval-strategy",
            "epoch",
        ]);
        cmd.arg("--test-file").arg(&s.dev);
        if padded {
            cmd.env("BERTFT_BUCKET_PADDING", "1");
        } else {
            cmd.env_remove("BERTFT_BUCKET_PADDING");
        }
        let stderr = String::from_utf8_lossy(&run_ok(&mut cmd).stderr).into_owned();
        assert_eq!(
            stderr.contains("notice: BERTFT_BUCKET_PADDING=1"),
            padded,
            "{stderr}"
        );
        let state = read_json(&out.join("trainer_state.json"));
        let logged = |key: &str| -> Vec<f64> {
            state["log_history"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e.get(key).and_then(Value::as_f64))
                .collect()
        };
        let predictions: Vec<Value> = std::fs::read_to_string(out.join("predict_results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            logged("loss"),
            logged("eval_loss"),
            read_json(&out.join("eval_results.json")),
            predictions,
        )
    };
    let (losses, eval_losses, results, predictions) = run("unpadded", false);
    let (p_losses, p_eval_losses, p_results, p_predictions) = run("padded", true);
    // Padding changes only the CPU GEMMs' summation order (another row count): the runs agree
    // to the 4 decimals the Trainer logs, after the drift of a few dozen steps.
    assert!(losses.len() >= 10, "{losses:?}");
    assert_eq!(losses.len(), p_losses.len());
    for (k, (a, b)) in losses.iter().zip(&p_losses).enumerate() {
        assert!((a - b).abs() <= 2e-4, "logged loss {k}: {a} vs {b}");
    }
    assert_eq!(eval_losses.len(), 2);
    for (a, b) in eval_losses.iter().zip(&p_eval_losses) {
        assert!((a - b).abs() <= 2e-4, "eval loss: {a} vs {b}");
    }
    for key in ["eval_accuracy", "eval_samples", "epoch"] {
        assert_eq!(results[key], p_results[key], "{key}");
    }
    assert_eq!(predictions.len(), 30);
    assert_eq!(predictions.len(), p_predictions.len());
    for (r, (a, b)) in predictions.iter().zip(&p_predictions).enumerate() {
        assert_eq!(a["label"], b["label"], "row {r}");
    }
}
