//! Out-of-memory errors worded in the run's terms: which batch did not fit, and which options
//! make it smaller.

use crate::backend::{is_out_of_memory, Backend};
use crate::model::bert::Batch;

/// The size of the batch that was running when memory ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub sequences: usize,
    /// Rows of its activations (real tokens, plus padding in a padded batch).
    pub tokens: usize,
    pub longest: usize,
}

impl BatchShape {
    pub fn of<B: Backend>(b: &Batch<B>) -> Self {
        BatchShape {
            sequences: b.size(),
            tokens: b.rows(),
            longest: b.layout.max_rows(),
        }
    }

    /// The largest (by tokens) of a step's micro-batches.
    pub fn largest<B: Backend>(batches: &[Batch<B>]) -> Option<Self> {
        batches.iter().map(Self::of).max_by_key(|s| s.tokens)
    }
}

/// `e` with the batch and the options to lower put in front when it is an out-of-memory error
/// (`batch_option`: the option that sets this batch's size); other errors are returned as they
/// are.
pub fn explain_out_of_memory(
    e: anyhow::Error,
    shape: Option<BatchShape>,
    batch_option: &str,
) -> anyhow::Error {
    if !is_out_of_memory(&e) {
        return e;
    }
    let batch = match shape {
        Some(s) => format!(
            "a batch of {} sequences ({} tokens, the longest {}) does not fit",
            s.sequences, s.tokens, s.longest
        ),
        None => "the batch does not fit".into(),
    };
    e.context(format!(
        "{batch}: lower {batch_option} (--gradient-accumulation-steps keeps the effective batch \
         size), --max-seq-length or --max-tokens-per-batch"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::OutOfMemory;

    #[test]
    fn out_of_memory_names_the_batch_and_the_options() {
        let e = anyhow::Error::new(OutOfMemory {
            what: "4096 bytes for 1024 elements".into(),
        })
        .context("layer 3 attention");
        let shape = BatchShape {
            sequences: 64,
            tokens: 8192,
            longest: 128,
        };
        let msg = format!(
            "{:#}",
            explain_out_of_memory(e, Some(shape), "--per-device-train-batch-size")
        );
        assert_eq!(
            msg,
            "a batch of 64 sequences (8192 tokens, the longest 128) does not fit: lower \
             --per-device-train-batch-size (--gradient-accumulation-steps keeps the effective \
             batch size), --max-seq-length or --max-tokens-per-batch: layer 3 attention: out of \
             GPU memory (4096 bytes for 1024 elements)"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn other_errors_pass_through_unchanged() {
        let e = anyhow::anyhow!("launching attention_forward_f32_d32: invalid argument");
        let msg = format!("{:#}", explain_out_of_memory(e, None, "--x"));
        assert_eq!(msg, "launching attention_forward_f32_d32: invalid argument");
    }
}
