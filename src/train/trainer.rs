//! The training loop with the Hugging Face Trainer's semantics: steps per epoch, logging,
//! evaluation and saving on their strategies, best-model tracking, early stopping, resume.
//!
//! Everything random is a pure function of the seeds and the position in the run (the data
//! order of epoch `e`, the dropout streams of micro-step `k`), so a run resumed from a
//! checkpoint continues exactly as the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::backend::Backend;
use crate::data::encoded::EncodedSet;
use crate::model::bert::Batch;
use crate::model::Classifier;
use crate::train::args::{IntervalStrategy, SaveStrategy, SchedulerChoice, TrainArgs};
use crate::train::checkpoint::{
    rotate_checkpoints, save_checkpoint, CheckpointContents, LoadedCheckpoint, RunPosition,
};
use crate::train::evaluate::{eval_metrics, predict};
use crate::train::loss_scale::{LossScaler, ScaleChange};
use crate::train::metrics::format_metrics_line;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::out_of_memory::{explain_out_of_memory, BatchShape};
use crate::train::plan::train_batcher;
pub use crate::train::plan::Plan;
use crate::train::prefetch::{prefetch, train_steps, HostStep, AHEAD};
use crate::train::progress::Progress;
use crate::train::pyjson::{dumps_line, PyDict, PyValue};
use crate::train::schedule::{Schedule, ScheduleKind};
use crate::train::state::TrainerState;
use crate::train::step::{queue_train_step, StepScratch, StepSettings};
use crate::train::tensorboard::EventWriter;

/// Set by the Ctrl-C handler: the loop saves a checkpoint and stops at the next step boundary.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Which metric picks the best checkpoint, and in which direction.
#[derive(Clone, Debug)]
pub struct BestMetric {
    pub name: String,
    pub greater_is_better: bool,
}

impl BestMetric {
    pub fn from_args(args: &TrainArgs) -> Option<BestMetric> {
        let tracked = args.metric_for_best_model.is_some()
            || args.load_best_model_at_end
            || args.save_strategy == SaveStrategy::Best
            || args.early_stopping_patience.is_some();
        if !tracked {
            return None;
        }
        let raw = args
            .metric_for_best_model
            .clone()
            .unwrap_or_else(|| "loss".into());
        let name = if raw.starts_with("eval_") {
            raw
        } else {
            format!("eval_{raw}")
        };
        let greater_is_better = args.greater_is_better.unwrap_or(!name.ends_with("loss"));
        Some(BestMetric {
            name,
            greater_is_better,
        })
    }

    fn better(&self, value: f64, than: f64, threshold: f64) -> bool {
        if self.greater_is_better {
            value > than + threshold
        } else {
            value < than - threshold
        }
    }
}

/// What the run writes besides checkpoints: TensorBoard events and a JSONL log.
struct RunLogs {
    events: Option<EventWriter>,
    jsonl: Option<std::fs::File>,
}

impl RunLogs {
    fn write(&mut self, entry: &PyDict) -> Result<()> {
        use std::io::Write;
        if let Some(f) = &mut self.jsonl {
            // As `json.dumps(entry)`: an inf or NaN float is written `Infinity` or `NaN`.
            writeln!(f, "{}", dumps_line(&PyValue::Dict(entry.clone())))?;
        }
        if let Some(ev) = &mut self.events {
            let step = entry.get("step").and_then(PyValue::as_i64).unwrap_or(0);
            for (k, v) in entry.iter() {
                let Some(x) = v.as_f64() else { continue };
                if k == "step" {
                    continue;
                }
                // TensorBoardCallback's naming: eval_loss → eval/loss, loss → train/loss.
                let tag = match k.strip_prefix("eval_") {
                    Some(rest) => format!("eval/{rest}"),
                    None => format!("train/{}", k.strip_prefix("train_").unwrap_or(k)),
                };
                ev.add_scalar(&tag, x as f32, step)?;
            }
            ev.flush()?;
        }
        Ok(())
    }
}

/// Everything one run needs, borrowed from the caller.
pub struct Trainer<'a, B: Backend> {
    pub backend: &'a B,
    pub args: &'a TrainArgs,
    pub model: &'a Classifier<B>,
    pub train: &'a EncodedSet,
    pub eval: Option<&'a EncodedSet>,
    pub tokenizer_dir: &'a Path,
    pub args_json: Value,
}

pub struct TrainOutcome {
    pub state: TrainerState,
    pub train_metrics: Vec<(String, f64)>,
    pub interrupted: bool,
}

fn schedule_kind(c: SchedulerChoice) -> ScheduleKind {
    match c {
        SchedulerChoice::Linear => ScheduleKind::Linear,
        SchedulerChoice::Cosine => ScheduleKind::Cosine,
        SchedulerChoice::Constant => ScheduleKind::Constant,
        SchedulerChoice::ConstantWithWarmup => ScheduleKind::ConstantWithWarmup,
    }
}

/// [`StepScratch::settle`], saying so when the settled fp16 step (`step`, 1-based) overflowed.
fn settle<B: Backend>(
    scratch: &mut StepScratch<B>,
    be: &B,
    opt: &mut AdamW<B>,
    progress: &mut Progress,
    step: u64,
) -> Result<()> {
    let settled = scratch.settle(be, opt)?;
    log_overflow(progress, settled, step);
    Ok(())
}

/// Says so when a settled fp16 step (`step`, 1-based) overflowed.
fn log_overflow(progress: &mut Progress, settled: Option<ScaleChange>, step: u64) {
    if let Some(ScaleChange::Backoff { from, to }) = settled {
        progress.log(&format!(
            "step {step}: fp16 gradients overflowed (inf/NaN): step skipped, loss scale \
             {from} -> {to}"
        ));
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

impl<B: Backend> Trainer<'_, B> {
    fn fresh_state(&self, plan: &Plan) -> TrainerState {
        TrainerState {
            eval_steps: plan.eval_steps,
            logging_steps: plan.logging_steps,
            save_steps: plan.save_steps,
            max_steps: plan.max_steps,
            num_train_epochs: plan.epochs,
            train_batch_size: Some(self.args.per_device_train_batch_size),
            ..TrainerState::default()
        }
    }

    /// Trains from the start, or from `resume` (a loaded checkpoint), to the end of the plan.
    pub fn run(&self, resume: Option<LoadedCheckpoint>) -> Result<TrainOutcome> {
        let (be, args, model) = (self.backend, self.args, self.model);
        let lengths = self.train.lengths();
        let batcher = train_batcher(args, &lengths);
        let plan = Plan::for_run(args, &batcher)?;
        let schedule = Schedule {
            kind: schedule_kind(args.lr_scheduler_type),
            base_lr: args.learning_rate,
            warmup_steps: plan.warmup_steps,
            total_steps: plan.max_steps,
        };
        let adam = AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        };
        let mut opt = AdamW::new(be, &model.layout, &model.params, &model.grads, adam)?;
        let data_seed = args.data_seed.unwrap_or(args.seed);
        let mut position = RunPosition {
            seed: args.seed,
            data_seed,
            epoch: 0,
            step_in_epoch: 0,
            micro_step: 0,
        };
        let mut state = self.fresh_state(&plan);
        let mut scratch = StepScratch::new(be)?;
        if let Some(ck) = resume {
            be.copy(&model.params, &be.upload(&ck.params)?)?;
            be.copy(&opt.exp_avg, &be.upload(&ck.exp_avg)?)?;
            be.copy(&opt.exp_avg_sq, &be.upload(&ck.exp_avg_sq)?)?;
            opt.step = ck.adam_step;
            position = ck.position;
            state = ck.state;
            // A run resumed with --fp16 from a run without it starts a fresh scaler.
            if let Some(saved) = ck.loss_scaler {
                scratch.set_loss_scaler(be, saved)?;
            }
        }
        let best = BestMetric::from_args(args);
        let settings = StepSettings {
            max_grad_norm: args.max_grad_norm,
            label_smoothing: args.label_smoothing_factor,
            dropout_seed: Some(args.seed),
        };
        let mut logs = self.open_logs()?;
        let to_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let started = Instant::now();
        let start_step = state.global_step;
        let step_samples =
            (args.per_device_train_batch_size * args.gradient_accumulation_steps) as u64;
        // Rows trained on: the Trainer's count (steps × batch size) with fixed-size batches, the
        // real rows with token-budget batches, whose sizes vary (before a resume: estimated).
        let by_budget = args.data.max_tokens_per_batch.is_some();
        let mut samples_done = start_step * step_samples;
        let mut progress =
            Progress::new(plan.max_steps, to_terminal).resume_at(start_step, samples_done);
        let (mut loss_since_log, mut steps_since_log) = (0.0f64, 0u64);
        let mut train_loss_sum = 0.0f64;
        let mut early_stop_count = 0u32;
        let already_done = state.global_step >= plan.max_steps;
        let mut interrupted = false;

        // The steps from the resumed position on, assembled ahead on a producer thread; each is
        // uploaded and queued here. Leaving the loop (the last step, early stopping, Ctrl-C, an
        // error) stops the producer.
        let steps = train_steps(
            self.train,
            batcher,
            args.gradient_accumulation_steps,
            (position.epoch, position.step_in_epoch),
            plan.epochs,
        );
        let pad_id = model.cfg.pad_token_id.unwrap_or(0);
        let consume = |steps: &mut dyn Iterator<Item = Result<HostStep>>| -> Result<()> {
            for step in steps {
                let mut stop = false;
                let step = step?;
                let micro_in_epoch = step.micro_in_epoch;
                let group_len = step.micro_batches.len() as u64;
                let batches = step
                    .micro_batches
                    .into_iter()
                    .map(|mut host| {
                        if be.pads_to_buckets() {
                            // One CUDA graph per bucket of sequence and row counts, not per
                            // batch.
                            host.pad_to_buckets(pad_id);
                        }
                        Batch::upload(be, host)
                    })
                    .collect::<Result<Vec<_>>>()?;
                // Queued: its loss and gradient norm are read on logging steps. The schedule
                // advances with the optimizer (`opt.step`): an fp16 step skipped on overflow
                // does not step it, as accelerate's scheduler wrapper does not.
                let settled = queue_train_step(
                    be,
                    model,
                    &mut opt,
                    &mut scratch,
                    &batches,
                    position.micro_step,
                    &|step| schedule.lr(step),
                    &settings,
                )
                .map_err(|e| {
                    let shape = BatchShape::largest(&batches);
                    explain_out_of_memory(e, shape, "--per-device-train-batch-size")
                })?;
                log_overflow(&mut progress, settled, state.global_step);
                state.global_step += 1;
                position.epoch = step.epoch;
                position.step_in_epoch = step.index + 1;
                position.micro_step += group_len;
                let micro_done = (position.step_in_epoch
                    * args.gradient_accumulation_steps.max(1) as u64)
                    .min(micro_in_epoch);
                state.epoch = position.epoch as f64 + micro_done as f64 / micro_in_epoch as f64;
                steps_since_log += 1;
                samples_done += if by_budget {
                    batches.iter().map(|b| b.real_size() as u64).sum()
                } else {
                    step_samples
                };
                progress.step(state.global_step, samples_done);

                let epoch_end = step.index + 1 == step.steps_in_epoch;
                let last = state.global_step >= plan.max_steps;
                let g = state.global_step;
                let log_now = match args.logging_strategy {
                    IntervalStrategy::Steps => {
                        g % plan.logging_steps == 0 || (g == 1 && args.logging_first_step)
                    }
                    IntervalStrategy::Epoch => epoch_end,
                    IntervalStrategy::No => false,
                };
                if log_now {
                    settle(&mut scratch, be, &mut opt, &mut progress, g)?;
                    let reports = scratch.take_reports(be, &mut opt)?;
                    let report = *reports.last().context("a logging step without a report")?;
                    for r in &reports {
                        loss_since_log += r.loss;
                        train_loss_sum += r.loss;
                    }
                    let mean_loss = loss_since_log / steps_since_log as f64;
                    progress.update_stats(mean_loss, report.lr, report.grad_norm, state.epoch);
                    // Printed as the Trainer's ProgressCallback prints it: without the step (an
                    // overflowed fp16 step's norm as `inf`, as Python prints a float).
                    let printed = [
                        ("loss".to_string(), round4(mean_loss)),
                        ("grad_norm".to_string(), report.grad_norm as f64),
                        ("learning_rate".to_string(), report.lr),
                        ("epoch".to_string(), state.epoch),
                    ];
                    progress.log(&format_metrics_line(&printed));
                    let mut entry = PyDict::of_floats(&printed);
                    entry.insert("step", PyValue::Int(g.into()));
                    logs.write(&entry)?;
                    state.log_history.push(entry);
                    (loss_since_log, steps_since_log) = (0.0, 0);
                }
                let eval_now = self.eval.is_some()
                    && match args.eval_strategy {
                        IntervalStrategy::Steps => g % plan.eval_steps == 0,
                        IntervalStrategy::Epoch => epoch_end,
                        IntervalStrategy::No => false,
                    };
                let mut new_best = false;
                if eval_now {
                    let metrics = self.evaluate(&mut scratch, state.epoch)?;
                    let mut entry = PyDict::of_floats(&metrics);
                    entry.insert("step", PyValue::Int(g.into()));
                    progress.log(&format_metrics_line(&metrics));
                    logs.write(&entry)?;
                    state.log_history.push(entry);
                    if let Some(b) = &best {
                        let value = metrics
                            .iter()
                            .find(|(k, _)| *k == b.name)
                            .map(|(_, v)| *v)
                            .with_context(|| {
                                format!("--metric-for-best-model {}: no such metric", b.name)
                            })?;
                        let improved = state
                            .best_metric
                            .is_none_or(|m| b.better(value, m, args.early_stopping_threshold));
                        new_best = state.best_metric.is_none_or(|m| b.better(value, m, 0.0));
                        if new_best {
                            state.best_metric = Some(value);
                            state.best_global_step = Some(g);
                        }
                        if let Some(patience) = args.early_stopping_patience {
                            early_stop_count = if improved { 0 } else { early_stop_count + 1 };
                            if early_stop_count >= patience {
                                progress.log(&format!(
                                    "early stopping: {} evaluations without improvement",
                                    patience
                                ));
                                stop = true;
                            }
                        }
                    }
                }
                if INTERRUPTED.load(Ordering::SeqCst) {
                    interrupted = true;
                    stop = true;
                }
                let save_now = interrupted
                    || match args.save_strategy {
                        SaveStrategy::Steps => g % plan.save_steps == 0 || last,
                        SaveStrategy::Epoch => epoch_end,
                        SaveStrategy::Best => new_best,
                        SaveStrategy::No => false,
                    };
                if epoch_end {
                    position.epoch += 1;
                    position.step_in_epoch = 0;
                }
                if save_now {
                    settle(&mut scratch, be, &mut opt, &mut progress, g)?;
                    let scaler = scratch.loss_scaler();
                    self.save(
                        model,
                        &opt,
                        &schedule,
                        &position,
                        scaler.as_ref(),
                        &mut state,
                    )?;
                }
                if stop || last {
                    break;
                }
            }
            Ok(())
        };
        if !already_done {
            prefetch(AHEAD, steps, consume)?;
        }
        progress.finish();
        // The steps after the last logging step, read back for train_loss.
        settle(&mut scratch, be, &mut opt, &mut progress, state.global_step)?;
        train_loss_sum += scratch
            .take_reports(be, &mut opt)?
            .iter()
            .map(|r| r.loss)
            .sum::<f64>();
        if interrupted {
            return Ok(TrainOutcome {
                state,
                train_metrics: vec![],
                interrupted,
            });
        }
        let runtime = started.elapsed().as_secs_f64();
        let steps_run = (state.global_step - start_step).max(1);
        let samples = samples_done - start_step * step_samples;
        let train_metrics = vec![
            ("train_runtime".to_string(), round4(runtime)),
            (
                "train_samples_per_second".to_string(),
                ((samples as f64 / runtime) * 1e3).round() / 1e3,
            ),
            (
                "train_steps_per_second".to_string(),
                ((steps_run as f64 / runtime) * 1e3).round() / 1e3,
            ),
            ("total_flos".to_string(), 0.0),
            ("train_loss".to_string(), train_loss_sum / steps_run as f64),
            ("epoch".to_string(), state.epoch),
        ];
        let mut entry = PyDict::of_floats(&train_metrics);
        entry.insert("step", PyValue::Int(state.global_step.into()));
        logs.write(&entry)?;
        state.log_history.push(entry);
        if args.load_best_model_at_end {
            self.load_best(&state)?;
        }
        Ok(TrainOutcome {
            state,
            train_metrics,
            interrupted,
        })
    }

    fn open_logs(&self) -> Result<RunLogs> {
        let dir = self.logging_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("log.jsonl");
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let events = match self.args.report_to {
            crate::train::args::ReportTo::Tensorboard => Some(EventWriter::create(&dir)?),
            crate::train::args::ReportTo::None => None,
        };
        Ok(RunLogs {
            events,
            jsonl: Some(jsonl),
        })
    }

    pub fn logging_dir(&self) -> PathBuf {
        self.args
            .logging_dir
            .clone()
            .unwrap_or_else(|| self.args.output_dir.join("runs"))
    }

    /// `trainer.evaluate()`: metrics on the evaluation set, with `epoch`, in the Trainer's order.
    fn evaluate(&self, scratch: &mut StepScratch<B>, epoch: f64) -> Result<Vec<(String, f64)>> {
        let set = self
            .eval
            .expect("evaluate is only called with an evaluation set");
        let p = predict(
            self.backend,
            self.model,
            &mut scratch.acts,
            set,
            self.args.data.eval_batching(),
            self.args.label_smoothing_factor,
        )?;
        let labels = set.labels.as_ref().expect("the evaluation set is labelled");
        let mut m = eval_metrics(&p, labels, self.model.cfg.num_labels());
        m.push(("epoch".into(), epoch));
        Ok(m)
    }

    fn save(
        &self,
        model: &Classifier<B>,
        opt: &AdamW<B>,
        schedule: &Schedule,
        position: &RunPosition,
        loss_scaler: Option<&LossScaler>,
        state: &mut TrainerState,
    ) -> Result<()> {
        let out = &self.args.output_dir;
        if let Some(best) = state.best_global_step {
            let dir = out.join(format!("checkpoint-{best}"));
            if best == state.global_step || dir.is_dir() {
                state.best_model_checkpoint = Some(dir.display().to_string());
            }
        }
        let contents = CheckpointContents {
            model,
            optimizer: opt,
            schedule,
            position,
            loss_scaler,
            state,
            args: &self.args_json,
            tokenizer_dir: Some(self.tokenizer_dir),
        };
        save_checkpoint(self.backend, out, &contents)?;
        let best = state.best_model_checkpoint.as_ref().map(PathBuf::from);
        rotate_checkpoints(out, self.args.save_total_limit, best.as_deref())?;
        Ok(())
    }

    fn load_best(&self, state: &TrainerState) -> Result<()> {
        let Some(dir) = &state.best_model_checkpoint else {
            return Ok(());
        };
        let ck = crate::train::checkpoint::load_checkpoint(
            Path::new(dir),
            &self.model.cfg,
            &self.model.layout,
        )?;
        self.backend
            .copy(&self.model.params, &self.backend.upload(&ck.params)?)?;
        eprintln!(
            "loaded the best model from {dir} (best_metric {:?})",
            state.best_metric
        );
        Ok(())
    }
}
