//! End-to-end training benchmarks (`bertft-cuda bench`): full training steps on random batches,
//! timed, with throughput, model FLOP/s, MFU and peak memory, in the columns
//! `benches/hf_reference.py` prints for PyTorch and the Hugging Face Trainer.

pub mod measure;
pub mod memory;
pub mod peak;
pub mod report;
pub mod stats;
pub mod workload;
