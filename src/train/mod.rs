//! Training: the optimizer, its learning-rate schedules and gradient clipping.

pub mod optimizer;
pub mod schedule;
