//! Training: the optimizer, its learning-rate schedules, gradient clipping, the step that
//! combines them, and what a run leaves behind (checkpoints, state, metrics, logs).

pub mod args;
pub mod checkpoint;
pub mod evaluate;
pub mod loss_scale;
pub mod metrics;
pub mod optimizer;
pub mod out_of_memory;
pub mod plan;
pub mod prefetch;
pub mod progress;
pub mod pyjson;
pub mod schedule;
pub mod state;
pub mod step;
pub mod tensorboard;
pub mod trainer;
