//! `bertft-cuda train`: `Trainer(...).train()` followed by `evaluate()` (and `predict()` with a
//! test file), writing what the Trainer and run_glue write.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::backend::Backend;
use crate::cli::evaluate::{evaluate_and_report, read_labelled, EvalReport};
use crate::cli::load::{load_model_with, resolve_model_dir, select_backend, Selected};
use crate::cli::predict::{predict_and_write, read_unlabelled};
use crate::data::dataset::{read_dataset, Columns, LabelMap};
use crate::data::encoded::EncodedSet;
use crate::model::weights::save_pretrained;
use crate::model::Classifier;
use crate::train::args::TrainArgs;
use crate::train::checkpoint::{latest_checkpoint, load_checkpoint};
use crate::train::pyjson::{PyDict, PyValue};
use crate::train::state::write_metrics_json;
use crate::train::step::ActivationCache;
use crate::train::trainer::{Trainer, INTERRUPTED};

pub fn columns(data: &crate::train::args::DataArgs) -> Columns {
    Columns {
        text: data.text_column.clone(),
        text_pair: data.text_pair_column.clone(),
        label: data.label_column.clone(),
    }
}

/// Refuses to write into a non-empty output_dir unless overwriting or resuming.
fn check_output_dir(args: &TrainArgs) -> Result<()> {
    let dir = &args.output_dir;
    let non_empty = dir.is_dir() && std::fs::read_dir(dir)?.next().is_some();
    if non_empty && !args.overwrite_output_dir && args.resume_from_checkpoint.is_none() {
        bail!(
            "{}: output directory exists and is not empty (use --overwrite-output-dir, or --resume-from-checkpoint to continue)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

pub fn run(args: &TrainArgs) -> Result<()> {
    args.check_batching()?;
    let backend = select_backend(args.data.device, args.data.matmul_precision()?)?;
    match backend.with_cuda_graphs(args.cuda_graphs) {
        Selected::Cpu(b) => run_on(&b, args),
        Selected::Cuda(b) => run_on(&*b, args),
    }
}

fn run_on<B: Backend>(backend: &B, args: &TrainArgs) -> Result<()> {
    check_output_dir(args)?;
    let model_dir = resolve_model_dir(&args.data.model)?;
    let cols = columns(&args.data);
    let train_raw = read_dataset(&args.train_file, &cols, true)?;
    let mut cfg = crate::config::BertConfig::from_file(&model_dir.join("config.json"))?;
    let label_map = LabelMap::from_training(
        train_raw.labels.as_deref().unwrap_or_default(),
        &cfg.id2label,
    )?;
    cfg.set_labels(label_map.id2label.clone());
    let loaded = load_model_with(&model_dir, cfg, args.seed)?;
    let max_len = args
        .data
        .max_seq_length
        .min(loaded.cfg.max_position_embeddings);
    let train = EncodedSet::encode(
        &loaded.tokenizer,
        &train_raw.texts,
        train_raw.pairs.as_deref(),
        Some(label_map.encode(&train_raw)?),
        max_len,
    )?;
    let eval = match &args.validation_file {
        Some(path) => Some(read_labelled(
            path,
            &cols,
            &label_map,
            &loaded.tokenizer,
            max_len,
        )?),
        None => None,
    };
    let resume = match args.resume_from_checkpoint.as_deref() {
        None => None,
        Some("true" | "True") => {
            let dir = latest_checkpoint(&args.output_dir)?.with_context(|| {
                format!(
                    "{}: no checkpoint to resume from",
                    args.output_dir.display()
                )
            })?;
            Some(dir)
        }
        Some(dir) => Some(Path::new(dir).to_path_buf()),
    };
    let resume = resume
        .map(|dir| {
            eprintln!("resuming from {}", dir.display());
            load_checkpoint(&dir, &loaded.cfg, &loaded.layout)
        })
        .transpose()?;
    let model = Classifier::new(backend, loaded.cfg.clone(), &loaded.flat)?;
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)");
        if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let trainer = Trainer {
        backend,
        args,
        model: &model,
        train: &train,
        eval: eval.as_ref(),
        tokenizer_dir: &model_dir,
        args_json: serde_json::to_value(args)?,
    };
    let outcome = trainer.run(resume)?;
    if outcome.interrupted {
        bail!(
            "interrupted at step {}: checkpoint saved in {}",
            outcome.state.global_step,
            args.output_dir.display()
        );
    }

    // What trainer.save_model(), trainer.save_state() and run_glue's metric files leave.
    let flat = backend.download(&model.params)?;
    save_pretrained(
        &args.output_dir,
        &model.cfg,
        &model.layout,
        &flat,
        Some(&model_dir),
    )?;
    outcome
        .state
        .save(&args.output_dir.join("trainer_state.json"))?;
    let mut train_results = PyDict::of_floats(&outcome.train_metrics);
    train_results.insert("train_samples", PyValue::Int(train.len() as i128));
    write_metrics_json(
        &args.output_dir.join("train_results.json"),
        &PyValue::Dict(train_results),
    )?;

    let mut acts = ActivationCache::default();
    let batching = args.data.eval_batching();
    if let Some(eval) = &eval {
        let report = EvalReport {
            smoothing: args.label_smoothing_factor,
            epoch: Some(outcome.state.epoch),
            output_dir: Some(&args.output_dir),
        };
        evaluate_and_report(backend, &model, &mut acts, eval, batching, &report)?;
    }
    if let Some(test) = &args.test_file {
        let set = read_unlabelled(test, &cols, &loaded.tokenizer, max_len)?;
        let output = args.output_dir.join("predict_results.jsonl");
        predict_and_write(backend, &model, &mut acts, &set, batching, Some(&output))?;
    }
    Ok(())
}
