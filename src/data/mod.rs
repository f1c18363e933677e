//! Text to model inputs: tokenization (and, with the trainer, readers and batching).

pub mod tokenize;
