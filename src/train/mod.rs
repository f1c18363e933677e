//! Training: the optimizer, its learning-rate schedules, gradient clipping and the step that
//! combines them.

pub mod optimizer;
pub mod schedule;
pub mod step;
