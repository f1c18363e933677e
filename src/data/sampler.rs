//! The order of examples and their grouping into batches, epoch by epoch.
