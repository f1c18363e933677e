//! Checkpoint folders: exact round trips, trainer_state.json as transformers writes it, finding
//! the latest checkpoint, rotation, atomic replacement, and one-line errors naming the file.

mod common;
use common::TempDir;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::Backend;
use bertft_cuda::config::BertConfig;
use bertft_cuda::model::params::ParamLayout;
use bertft_cuda::model::weights::load_weights;
use bertft_cuda::model::Classifier;
use bertft_cuda::train::checkpoint::*;
use bertft_cuda::train::loss_scale::LossScaler;
use bertft_cuda::train::optimizer::{AdamW, AdamWConfig};
use bertft_cuda::train::pyjson::{PyDict, PyValue};
use bertft_cuda::train::schedule::{Schedule, ScheduleKind};
use bertft_cuda::train::state::TrainerState;
use common::tiny::{random_vec, tiny_config, tiny_weights};
use serde_json::{json, Value};

/// A model and an optimizer that has taken `steps` real updates (non-zero, distinct moments).
struct Run {
    be: CpuBackend,
    model: Classifier<CpuBackend>,
    opt: AdamW<CpuBackend>,
    loss_scaler: Option<LossScaler>,
}

impl Run {
    fn new(weights_seed: u64, steps: u64) -> Run {
        Run::with_config(tiny_config("gelu"), weights_seed, steps)
    }

    fn with_config(cfg: BertConfig, weights_seed: u64, steps: u64) -> Run {
        let be = CpuBackend::FP32;
        let model = Classifier::new(&be, cfg.clone(), &tiny_weights(&cfg, weights_seed)).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&be, &model.layout, &model.params, &model.grads, config).unwrap();
        for s in 0..steps {
            let g = be
                .upload(&random_vec(model.layout.total, 100 + s, 1.0))
                .unwrap();
            be.copy(&model.grads, &g).unwrap();
            opt.update(&be, 1e-3).unwrap();
        }
        Run {
            be,
            model,
            opt,
            loss_scaler: None,
        }
    }

    fn save(
        &self,
        out: &Path,
        state: &TrainerState,
        tokenizer_dir: Option<&Path>,
    ) -> anyhow::Result<PathBuf> {
        save_checkpoint(
            &self.be,
            out,
            &CheckpointContents {
                model: &self.model,
                optimizer: &self.opt,
                schedule: &schedule(),
                position: &position(),
                loss_scaler: self.loss_scaler.as_ref(),
                state,
                args: &args(),
                tokenizer_dir,
            },
        )
    }

    fn params(&self) -> Vec<f32> {
        self.be.download(&self.model.params).unwrap()
    }
}

fn schedule() -> Schedule {
    Schedule {
        kind: ScheduleKind::Cosine,
        // Not a short decimal: its shortest form has 17 digits.
        base_lr: 3e-5 * 1.1,
        warmup_steps: 4,
        total_steps: 90,
    }
}

fn position() -> RunPosition {
    RunPosition {
        seed: 42,
        data_seed: 7,
        epoch: 1,
        step_in_epoch: 13,
        micro_step: 86,
    }
}

fn args() -> Value {
    json!({"output_dir": "out", "learning_rate": 3.3e-5, "num_train_epochs": 3,
           "lr_scheduler_type": "cosine", "save_total_limit": null, "fp16": false})
}

fn entry(v: Value) -> PyDict {
    match PyValue::from(&v) {
        PyValue::Dict(d) => d,
        other => panic!("not an object: {other:?}"),
    }
}

fn state(global_step: u64) -> TrainerState {
    TrainerState {
        // Values whose shortest decimal forms serde_json's default parser misreads by an ulp.
        epoch: 1.0 + 13.0 / 30.0,
        global_step,
        max_steps: 90,
        logging_steps: 5,
        eval_steps: 10,
        save_steps: 10,
        train_batch_size: Some(8),
        num_train_epochs: 3,
        total_flos: 9.342536945028225e13,
        log_history: vec![
            entry(
                json!({"loss": std::f64::consts::LN_2, "grad_norm": 9.342536945028225,
                         "learning_rate": 3.3e-5, "epoch": 1.0 / 6.0, "step": 5}),
            ),
            entry(
                json!({"eval_loss": 0.1 + 0.2, "eval_accuracy": 0.8125, "epoch": 1.0 / 3.0,
                         "step": 10}),
            ),
        ],
        best_metric: Some(0.8125),
        best_global_step: Some(10),
        best_model_checkpoint: Some("out/checkpoint-10".into()),
        stateful_callbacks: json!({"TrainerControl": {"args": {"should_save": true,
            "should_training_stop": false}, "attributes": {}}}),
        ..TrainerState::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn tokenizer_dir(root: &Path) -> PathBuf {
    let dir = root.join("tok");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n").unwrap();
    dir
}

#[test]
fn save_then_load_is_bit_identical() {
    let tmp = TempDir::new("checkpoint-roundtrip");
    let out = tmp.path().join("out");
    let run = Run::new(5, 3);
    let st = state(20);
    let dir = run
        .save(&out, &st, Some(&tokenizer_dir(tmp.path())))
        .unwrap();
    assert_eq!(dir, out.join("checkpoint-20"));
    assert_eq!(names_in(&out), ["checkpoint-20"], "no temporary leftovers");
    assert_eq!(
        names_in(&dir),
        [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "rng_state.json",
            "scheduler.json",
            "trainer_state.json",
            "training_args.json",
            "vocab.txt",
        ]
    );

    let cfg = &run.model.cfg;
    let loaded = load_checkpoint(&dir, cfg, &run.model.layout).unwrap();
    assert_eq!(bits(&loaded.params), bits(&run.params()));
    let exp_avg = run.be.download(&run.opt.exp_avg).unwrap();
    let exp_avg_sq = run.be.download(&run.opt.exp_avg_sq).unwrap();
    assert!(exp_avg.iter().all(|v| *v != 0.0), "moments are exercised");
    assert_eq!(bits(&loaded.exp_avg), bits(&exp_avg));
    assert_eq!(bits(&loaded.exp_avg_sq), bits(&exp_avg_sq));
    assert_eq!(loaded.adam_step, 3);
    assert_eq!(loaded.schedule, schedule());
    assert_eq!(
        loaded.schedule.base_lr.to_bits(),
        schedule().base_lr.to_bits()
    );
    assert_eq!(loaded.schedule_last_step, 3);
    assert_eq!(loaded.position, position());
    assert_eq!(loaded.state, st);
    assert_eq!(loaded.state.epoch.to_bits(), st.epoch.to_bits());
    assert_eq!(loaded.args, args());

    // The model part is a from_pretrained folder in its own right.
    let w = load_weights(&dir, cfg, &run.model.layout, 0).unwrap();
    assert_eq!(bits(&w.flat), bits(&run.params()));
    assert!(w.notices.is_empty(), "{:?}", w.notices);
}

/// `TrainerState(...).save_to_json(path)` in transformers 5.24 for the same values, byte for byte.
const PYTHON_TRAINER_STATE: &str = r#"{
  "best_global_step": 10,
  "best_metric": 0.8125,
  "best_model_checkpoint": "out/checkpoint-10",
  "epoch": 1.3333333333333333,
  "eval_steps": 10,
  "global_step": 20,
  "is_hyper_param_search": false,
  "is_local_process_zero": true,
  "is_world_process_zero": true,
  "log_history": [
    {
      "epoch": 0.3333333333333333,
      "grad_norm": 3.0517578125e-05,
      "learning_rate": 5e-05,
      "loss": 0.6934,
      "step": 5
    },
    {
      "epoch": 0.6666666666666666,
      "eval_accuracy": 0.8125,
      "eval_loss": 0.5,
      "eval_runtime": 0.0123,
      "note": "caf\u00e9 \ud83d\ude00 \"q\" \\ \n\t\u007f",
      "step": 10
    }
  ],
  "logging_steps": 5,
  "max_steps": 45,
  "num_input_tokens_seen": 0,
  "num_train_epochs": 3,
  "save_steps": 10,
  "stateful_callbacks": {
    "TrainerControl": {
      "args": {
        "should_save": true,
        "should_training_stop": false
      },
      "attributes": {}
    }
  },
  "total_flos": 1.2345e+16,
  "train_batch_size": 8,
  "trial_name": null,
  "trial_params": null
}
"#;

#[test]
fn the_fp16_loss_scaler_is_saved_only_when_the_run_has_one() {
    let tmp = TempDir::new("checkpoint-scaler");
    let mut run = Run::new(1, 1);
    let dir = run
        .save(&tmp.path().join("without"), &state(3), None)
        .unwrap();
    assert!(!dir.join(SCALER_FILE).exists());
    let cfg = tiny_config("gelu");
    let loaded = load_checkpoint(&dir, &cfg, &run.model.layout).unwrap();
    assert_eq!(loaded.loss_scaler, None);

    let scaler = LossScaler {
        scale: 8192.0,
        growth_tracker: 17,
    };
    run.loss_scaler = Some(scaler);
    let dir = run.save(&tmp.path().join("with"), &state(3), None).unwrap();
    let loaded = load_checkpoint(&dir, &cfg, &run.model.layout).unwrap();
    assert_eq!(loaded.loss_scaler, Some(scaler));
}

#[test]
fn trainer_state_json_is_what_transformers_writes() {
    let st = TrainerState {
        epoch: 1.3333333333333333,
        global_step: 20,
        max_steps: 45,
        logging_steps: 5,
        eval_steps: 10,
        save_steps: 10,
        train_batch_size: Some(8),
        num_train_epochs: 3,
        total_flos: 1.2345e16,
        // Keys in a different order than the file: saving sorts them.
        log_history: vec![
            entry(
                json!({"loss": 0.6934, "grad_norm": 3.0517578125e-05, "learning_rate": 5e-05,
                         "epoch": 0.3333333333333333, "step": 5}),
            ),
            entry(
                json!({"eval_loss": 0.5, "eval_accuracy": 0.8125, "eval_runtime": 0.0123,
                         "epoch": 0.6666666666666666, "step": 10,
                         "note": "caf\u{e9} \u{1F600} \"q\" \\ \n\t\u{7f}"}),
            ),
        ],
        best_metric: Some(0.8125),
        best_global_step: Some(10),
        best_model_checkpoint: Some("out/checkpoint-10".into()),
        stateful_callbacks: json!({"TrainerControl": {"attributes": {}, "args": {
            "should_training_stop": false, "should_save": true}}}),
        ..TrainerState::default()
    };
    assert_eq!(st.to_json(), PYTHON_TRAINER_STATE);

    let tmp = TempDir::new("checkpoint-state");
    let path = tmp.path().join("trainer_state.json");
    st.save(&path).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), PYTHON_TRAINER_STATE);
    assert_eq!(TrainerState::load(&path).unwrap(), st);
    assert_eq!(names_in(tmp.path()), ["trainer_state.json"]);
}

/// A state whose log holds the floats JSON has no literal for: an fp16 step that overflowed
/// (`grad_norm` inf), a diverged one (NaN), and a NaN best metric.
fn state_with_non_finite_floats() -> TrainerState {
    let mut overflowed = entry(json!({"loss": 0.6934, "learning_rate": 5e-05, "step": 5}));
    overflowed.insert("grad_norm", PyValue::Float(f64::INFINITY));
    let mut diverged = entry(json!({"step": 10, "epoch": 0.5}));
    diverged.insert("loss", PyValue::Float(f64::NAN));
    diverged.insert("grad_norm", PyValue::Float(f64::NEG_INFINITY));
    TrainerState {
        global_step: 10,
        log_history: vec![overflowed, diverged],
        best_metric: Some(f64::NAN),
        ..TrainerState::default()
    }
}

/// The state's floats, NaN compared by its bits (NaN != NaN).
fn float_bits(st: &TrainerState) -> Vec<Vec<(String, Option<u64>)>> {
    let mut all: Vec<Vec<(String, Option<u64>)>> = st
        .log_history
        .iter()
        .map(|e| {
            let mut items: Vec<_> = e
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_f64().map(f64::to_bits)))
                .collect();
            items.sort();
            items
        })
        .collect();
    all.push(vec![(
        "best_metric".into(),
        st.best_metric.map(f64::to_bits),
    )]);
    all
}

#[test]
fn non_finite_floats_are_written_as_python_writes_them_and_read_back() {
    let tmp = TempDir::new("checkpoint-non-finite");
    let path = tmp.path().join("trainer_state.json");
    let st = state_with_non_finite_floats();
    st.save(&path).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    // json.dumps writes float('inf') as Infinity, float('nan') as NaN.
    for line in [
        "\"best_metric\": NaN,",
        "      \"grad_norm\": Infinity,",
        "      \"grad_norm\": -Infinity,",
        "      \"loss\": NaN,",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(!text.contains("null,\n      \"learning_rate\""), "{text}");
    let back = TrainerState::load(&path).unwrap();
    assert_eq!(float_bits(&back), float_bits(&st));
    assert_eq!(back.to_json(), text);

    // Python's json module reads it back to the same values and writes the same bytes.
    let check = "import json, math, sys\n\
        text = open(sys.argv[1]).read()\n\
        s = json.loads(text)\n\
        assert math.isnan(s['best_metric'])\n\
        assert s['log_history'][0]['grad_norm'] == float('inf')\n\
        assert s['log_history'][1]['grad_norm'] == -float('inf')\n\
        assert math.isnan(s['log_history'][1]['loss'])\n\
        assert json.dumps(s, indent=2, sort_keys=True) + '\\n' == text\n";
    match std::process::Command::new("python3")
        .args(["-c", check])
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "python3's json module disagrees:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped the Python check: no python3")
        }
        Err(e) => panic!("python3: {e}"),
    }
}

#[test]
fn a_malformed_log_history_is_a_one_line_error_naming_the_file() {
    let tmp = TempDir::new("checkpoint-bad-history");
    let path = tmp.path().join("trainer_state.json");
    for (text, want) in [
        (
            "{\"log_history\": [{\"loss\": 1}, 3]}",
            "log_history[1] is not an object",
        ),
        ("{\"log_history\": {}}", "log_history is not a list"),
        ("{\"best_metric\": \"x\"}", "best_metric is not a number"),
        ("[]", "not a JSON object"),
        ("{\"global_step\": Infinity}", "expected u64"),
        (
            "{\"log_history\": [\n{\"loss\": Infinit}]}",
            "line 2 column",
        ),
    ] {
        fs::write(&path, text).unwrap();
        let e = format!("{:#}", TrainerState::load(&path).unwrap_err());
        assert!(
            e.contains(want) && e.contains("trainer_state.json") && !e.contains('\n'),
            "{text}: {e}"
        );
    }
}

#[test]
fn saved_trainer_state_has_sorted_keys_and_two_space_indent() {
    let tmp = TempDir::new("checkpoint-sorted");
    let dir = Run::new(1, 1).save(tmp.path(), &state(7), None).unwrap();
    let text = fs::read_to_string(dir.join("trainer_state.json")).unwrap();
    assert!(text.starts_with("{\n  \"") && text.ends_with("\n}\n"));
    let top_keys: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("  \"") && !l.starts_with("   "))
        .map(|l| l[3..].split('"').next().unwrap())
        .collect();
    let mut sorted = top_keys.clone();
    sorted.sort();
    assert_eq!(top_keys, sorted);
    assert_eq!(top_keys.len(), 20, "every TrainerState field: {top_keys:?}");
    // Nested objects are sorted too and indented two more spaces per level.
    let first_log = text.find("\"log_history\": [\n    {\n      \"epoch\"");
    assert!(first_log.is_some(), "{text}");
    assert!(text.contains("\"stateful_callbacks\": {\n    \"TrainerControl\": {\n      \"args\""));
    assert_eq!(
        TrainerState::load(&dir.join("trainer_state.json")).unwrap(),
        state(7)
    );
}

#[test]
fn latest_checkpoint_goes_by_step_and_skips_leftovers() {
    let tmp = TempDir::new("checkpoint-latest");
    let out = tmp.path();
    assert_eq!(latest_checkpoint(&out.join("absent")).unwrap(), None);
    assert_eq!(latest_checkpoint(out).unwrap(), None);
    for name in [
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-12.tmp-123",
        "runs",
    ] {
        fs::create_dir(out.join(name)).unwrap();
    }
    // A file is not a checkpoint, whatever its name.
    fs::write(out.join("checkpoint-11"), "").unwrap();
    assert_eq!(
        latest_checkpoint(out).unwrap(),
        Some(out.join("checkpoint-10"))
    );
    let listed: Vec<u64> = list_checkpoints(out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(listed, [9, 10]);
}

fn make_checkpoints(out: &Path, steps: &[u64]) {
    for s in steps {
        let dir = checkpoint_dir(out, *s);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("trainer_state.json"), "{}\n").unwrap();
    }
}

fn remaining(out: &Path) -> Vec<String> {
    names_in(out)
}

#[test]
fn rotation_keeps_the_newest_and_the_best() {
    let tmp = TempDir::new("checkpoint-rotate");
    let out = tmp.path();
    make_checkpoints(out, &[2, 4, 6, 8, 10]);
    fs::create_dir(out.join("checkpoint-12.tmp-1")).unwrap();

    assert!(rotate_checkpoints(out, None, None).unwrap().is_empty());
    assert!(rotate_checkpoints(out, Some(0), None).unwrap().is_empty());
    assert!(rotate_checkpoints(out, Some(5), None).unwrap().is_empty());

    // The best is spelled differently from the listing; it is the same folder.
    let best = out.join(".").join("checkpoint-4");
    let deleted = rotate_checkpoints(out, Some(2), Some(&best)).unwrap();
    assert_eq!(
        deleted,
        [2, 6, 8].map(|s| checkpoint_dir(out, s)).to_vec(),
        "oldest first, the best skipped"
    );
    assert_eq!(
        remaining(out),
        ["checkpoint-10", "checkpoint-12.tmp-1", "checkpoint-4"]
    );

    // Without a best, the newest `limit` stay.
    make_checkpoints(out, &[12, 14]);
    let deleted = rotate_checkpoints(out, Some(2), None).unwrap();
    assert_eq!(deleted, [4, 10].map(|s| checkpoint_dir(out, s)).to_vec());
    assert_eq!(
        remaining(out),
        ["checkpoint-12", "checkpoint-12.tmp-1", "checkpoint-14"]
    );

    // Limit 1 with a best that is not the newest keeps both (transformers' floor of two).
    let deleted = rotate_checkpoints(out, Some(1), Some(&checkpoint_dir(out, 12))).unwrap();
    assert!(deleted.is_empty());
    let deleted = rotate_checkpoints(out, Some(1), Some(&checkpoint_dir(out, 14))).unwrap();
    assert_eq!(deleted, [checkpoint_dir(out, 12)]);
    assert_eq!(remaining(out), ["checkpoint-12.tmp-1", "checkpoint-14"]);
}

fn set_mtime(dir: &Path, t: SystemTime) {
    File::open(dir).unwrap().set_modified(t).unwrap();
}

#[test]
fn rotation_orders_by_modification_time_when_it_is_meaningful() {
    // A run resumed from checkpoint-10 while an older run's checkpoint-30 is still there, then
    // saves checkpoint-20: the just-saved folder is the most recent, as transformers sees it.
    let tmp = TempDir::new("checkpoint-mtime");
    let out = tmp.path();
    make_checkpoints(out, &[10, 20, 30]);
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    set_mtime(&checkpoint_dir(out, 30), t0);
    set_mtime(&checkpoint_dir(out, 10), t0 + Duration::from_secs(60));
    set_mtime(&checkpoint_dir(out, 20), t0 + Duration::from_secs(120));
    let deleted = rotate_checkpoints(out, Some(1), None).unwrap();
    assert_eq!(deleted, [30, 10].map(|s| checkpoint_dir(out, s)).to_vec());
    assert_eq!(remaining(out), ["checkpoint-20"]);
}

#[test]
fn saving_over_an_existing_checkpoint_replaces_it_whole() {
    let tmp = TempDir::new("checkpoint-replace");
    let out = tmp.path().join("out");
    let first = Run::new(1, 2);
    let dir = first.save(&out, &state(5), None).unwrap();
    fs::write(dir.join("stale.txt"), "from the first save").unwrap();

    let second = Run::new(2, 4);
    let dir2 = second.save(&out, &state(5), None).unwrap();
    assert_eq!(dir, dir2);
    assert_eq!(names_in(&out), ["checkpoint-5"], "no temporary leftovers");
    assert!(
        !dir.join("stale.txt").exists(),
        "the old folder is gone, not merged"
    );
    let loaded = load_checkpoint(&dir, &second.model.cfg, &second.model.layout).unwrap();
    assert_eq!(bits(&loaded.params), bits(&second.params()));
    assert_eq!(loaded.adam_step, 4);

    // A save that fails (here: a tokenizer folder without tokenizer files) leaves the existing
    // checkpoint as it was and nothing else behind.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = Run::new(3, 1)
        .save(&out, &state(5), Some(&empty))
        .unwrap_err();
    assert!(format!("{err:#}").contains("no tokenizer files"), "{err:#}");
    assert_eq!(names_in(&out), ["checkpoint-5"]);
    let still = load_checkpoint(&dir, &second.model.cfg, &second.model.layout).unwrap();
    assert_eq!(bits(&still.params), bits(&second.params()));
}

/// The error of loading `dir`, checked to be one line that names `file`.
fn load_error(dir: &Path, cfg: &BertConfig, file: &str) -> String {
    let err = load_checkpoint(dir, cfg, &ParamLayout::new(cfg)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        err.to_string()
            .contains(&dir.join(file).display().to_string()),
        "names {file}: {msg}"
    );
    msg
}

#[test]
fn broken_files_give_one_line_errors_naming_them() {
    let tmp = TempDir::new("checkpoint-errors");
    let run = Run::new(1, 1);
    let cfg = run.model.cfg.clone();
    let fresh = |tag: &str| run.save(&tmp.path().join(tag), &state(1), None).unwrap();

    let dir = fresh("truncated");
    let opt = dir.join("optimizer.safetensors");
    let len = fs::metadata(&opt).unwrap().len();
    File::options()
        .write(true)
        .open(&opt)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let msg = load_error(&dir, &cfg, "optimizer.safetensors");
    assert!(msg.contains("not a valid safetensors file"), "{msg}");

    let dir = fresh("garbage");
    fs::write(
        dir.join("optimizer.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json}      ",
    )
    .unwrap();
    load_error(&dir, &cfg, "optimizer.safetensors");

    let dir = fresh("empty");
    fs::write(dir.join("model.safetensors"), b"").unwrap();
    load_error(&dir, &cfg, "model.safetensors");

    let dir = fresh("missing");
    fs::remove_file(dir.join("scheduler.json")).unwrap();
    let msg = load_error(&dir, &cfg, "scheduler.json");
    assert!(msg.starts_with("cannot read"), "{msg}");

    let dir = fresh("corrupt-state");
    fs::write(dir.join("trainer_state.json"), "{\"global_step\": 3,\n").unwrap();
    let msg = load_error(&dir, &cfg, "trainer_state.json");
    assert!(msg.contains("line 2"), "{msg}");

    let dir = fresh("wrong-type");
    fs::write(dir.join("rng_state.json"), "{\"seed\": \"42\"}").unwrap();
    load_error(&dir, &cfg, "rng_state.json");

    let dir = fresh("bad-kind");
    let sched = fs::read_to_string(dir.join("scheduler.json")).unwrap();
    fs::write(
        dir.join("scheduler.json"),
        sched.replace("\"cosine\"", "\"polynomial\""),
    )
    .unwrap();
    load_error(&dir, &cfg, "scheduler.json");

    // Resuming with a differently shaped model: config.json says so.
    let mut raw = cfg.raw.clone();
    raw.insert("num_labels".into(), json!(2));
    let two_labels = BertConfig::from_json(&Value::Object(raw).to_string()).unwrap();
    let dir = fresh("other-model");
    let msg = load_error(&dir, &two_labels, "config.json");
    assert!(
        msg.contains("classifier.weight is [3, 20] there, [2, 20] here"),
        "{msg}"
    );

    // The optimizer file of that other model in a checkpoint of this one: a wrong shape.
    let other = Run::with_config(two_labels, 1, 1)
        .save(&tmp.path().join("two-labels"), &state(1), None)
        .unwrap();
    let dir = fresh("other-optimizer");
    fs::copy(
        other.join("optimizer.safetensors"),
        dir.join("optimizer.safetensors"),
    )
    .unwrap();
    let msg = load_error(&dir, &cfg, "optimizer.safetensors");
    assert!(
        msg.contains("tensor exp_avg.classifier.weight has shape [2, 20]"),
        "{msg}"
    );

    let dir = fresh("no-step");
    let mut bytes = fs::read(dir.join("optimizer.safetensors")).unwrap();
    let at = bytes.windows(6).position(|w| w == b"\"step\"").unwrap();
    bytes[at + 1..at + 5].copy_from_slice(b"stop");
    fs::write(dir.join("optimizer.safetensors"), bytes).unwrap();
    let msg = load_error(&dir, &cfg, "optimizer.safetensors");
    assert!(msg.contains("no \"step\""), "{msg}");
}
