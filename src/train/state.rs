//! `trainer_state.json` as transformers writes it, and the files around it.
//!
//! transformers saves `TrainerState` with `json.dumps(dataclasses.asdict(state), indent=2,
//! sort_keys=True) + "\n"`; this writes the same bytes and reads what Python writes (see
//! [`crate::train::pyjson`]), `NaN` and `Infinity` included: an fp16 step that overflowed logs
//! `"grad_norm": Infinity`, a diverged run `NaN`.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::weights::write_atomic;
use crate::train::pyjson::{dumps_file, dumps_indented, loads, PyDict, PyValue};

/// transformers' `TrainerState` (5.x): the same fields under the same names.
///
/// Fields missing from a file take transformers' defaults (files from older versions lack some);
/// fields this struct does not know are ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct TrainerState {
    /// Epochs done, fractional within an epoch.
    pub epoch: f64,
    /// Optimizer steps done.
    pub global_step: u64,
    pub max_steps: u64,
    pub logging_steps: u64,
    pub eval_steps: u64,
    pub save_steps: u64,
    /// `None` only before training starts; the Trainer sets it when the loop begins.
    pub train_batch_size: Option<usize>,
    pub num_train_epochs: u64,
    pub num_input_tokens_seen: u64,
    pub total_flos: f64,
    /// One object per log call (`loss`, `learning_rate`, `eval_*`, `epoch`, `step`, ...).
    /// Written and read by [`TrainerState::to_json`] and [`TrainerState::load`] themselves, not
    /// by serde: their floats may be inf or NaN, which serde_json's values cannot hold.
    #[serde(skip)]
    pub log_history: Vec<PyDict>,
    /// As `log_history`, written and read outside serde (an eval loss can be NaN).
    #[serde(skip)]
    pub best_metric: Option<f64>,
    pub best_global_step: Option<u64>,
    /// The path of the best checkpoint folder, as the Trainer writes it (`<output_dir>/checkpoint-N`).
    pub best_model_checkpoint: Option<String>,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub is_hyper_param_search: bool,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
    /// Callback states by class name (`TrainerControl`, `EarlyStoppingCallback`, ...).
    pub stateful_callbacks: Value,
}

impl Default for TrainerState {
    /// The dataclass defaults (after its `__post_init__`: empty history, no callbacks).
    fn default() -> Self {
        TrainerState {
            epoch: 0.0,
            global_step: 0,
            max_steps: 0,
            logging_steps: 500,
            eval_steps: 500,
            save_steps: 500,
            train_batch_size: None,
            num_train_epochs: 0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: Value::Object(Map::new()),
        }
    }
}

impl TrainerState {
    /// The file's text as `TrainerState.save_to_json` writes it.
    ///
    /// `epoch` and `total_flos`, always finite, go through serde; a non-finite value there would
    /// be written `null`.
    pub fn to_json(&self) -> String {
        let value = serde_json::to_value(self).expect("TrainerState has string keys only");
        let PyValue::Dict(mut fields) = PyValue::from(&value) else {
            unreachable!("a struct serializes to an object")
        };
        let history = self.log_history.iter().cloned().map(PyValue::Dict);
        fields.insert("log_history", PyValue::List(history.collect()));
        fields.insert(
            "best_metric",
            self.best_metric.map_or(PyValue::Null, PyValue::Float),
        );
        dumps_file(&PyValue::Dict(fields))
    }

    /// Writes `path` atomically (temporary name in the same folder, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.to_json();
        write_atomic(path, |tmp| fs::write(tmp, &text).map_err(Into::into))
    }

    /// Reads a `trainer_state.json`; every error is one line naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let at = |e: String| anyhow!("{}: {e}", path.display());
        let PyValue::Dict(mut fields) = read_python_json(path)? else {
            return Err(at("not a JSON object".into()));
        };
        let log_history = match fields.remove("log_history") {
            None | Some(PyValue::Null) => Vec::new(),
            Some(PyValue::List(entries)) => entries
                .into_iter()
                .enumerate()
                .map(|(i, entry)| match entry {
                    PyValue::Dict(d) => Ok(d),
                    _ => Err(at(format!("log_history[{i}] is not an object"))),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(at("log_history is not a list".into())),
        };
        let best_metric = match fields.remove("best_metric") {
            None | Some(PyValue::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| at("best_metric is not a number".into()))?,
            ),
        };
        let mut state: TrainerState = serde_json::from_value(PyValue::Dict(fields).to_value())
            .map_err(|e| at(e.to_string()))?;
        state.log_history = log_history;
        state.best_metric = best_metric;
        Ok(state)
    }
}

/// Reads a JSON file as Python's `json.load` does; every error is one line naming the file.
fn read_python_json(path: &Path) -> Result<PyValue> {
    let text =
        fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    loads(&text).map_err(|e| anyhow!("{}: invalid JSON ({e})", path.display()))
}

/// Reads a JSON file (Python's dialect) into `T`; every error is one line naming the file.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let value = read_python_json(path)?.to_value();
    serde_json::from_value(value).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Writes `value` as Python's `json.dumps(value, indent=2, sort_keys=True) + "\n"`, atomically.
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    write_python_json(path, &PyValue::from(value))
}

/// As [`write_json`], for a value whose floats may be inf or NaN.
pub(crate) fn write_python_json(path: &Path, value: &PyValue) -> Result<()> {
    let text = dumps_file(value);
    write_atomic(path, |tmp| fs::write(tmp, &text).map_err(Into::into))
}

/// A `*_results.json` file as `Trainer.save_metrics` writes it: `json.dump(metrics, f,
/// indent=4, sort_keys=True)`, atomically.
pub(crate) fn write_metrics_json(path: &Path, metrics: &PyValue) -> Result<()> {
    let text = dumps_indented(metrics, 4);
    write_atomic(path, |tmp| fs::write(tmp, &text).map_err(Into::into))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_dataclass_defaults() {
        // TrainerState().__dict__ in transformers 5.
        let d: TrainerState = serde_json::from_str("{}").unwrap();
        assert_eq!(d, TrainerState::default());
        assert_eq!(
            (d.logging_steps, d.eval_steps, d.save_steps),
            (500, 500, 500)
        );
        assert!(d.is_local_process_zero && d.is_world_process_zero);
        assert_eq!(d.stateful_callbacks, serde_json::json!({}));
    }
}
