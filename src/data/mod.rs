//! Text to model inputs: dataset files, label ids, tokenization, batch order.

pub mod dataset;
pub mod encoded;
pub mod sampler;
pub mod tokenize;
