//! bertft-cuda: fine-tune BERT-family sequence classifiers, with hand-written CUDA kernels and a
//! plain-Rust CPU reference behind one op boundary.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod model;
pub mod train;
