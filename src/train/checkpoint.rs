//! Checkpoint folders: everything needed to resume a run exactly.
