//! Batches assembled on a background thread while the device works.
//!
//! A training step is queued, not waited for (`train::step`), so between two steps the host
//! has only to gather the next step's rows into flat id arrays and upload them. Done inline,
//! that gathering (and, at an epoch's start, the epoch's sampling order) sits between two
//! launches; here a producer thread builds [`HostBatch`]es a few steps ahead, in order, and the
//! caller's thread only uploads and queues them. The upload stays on the caller's thread
//! because backend handles need not be `Send`. The batches, and their order, are exactly those
//! built inline.
//!
//! The producer stops when the consumer returns (its receiver dropped, a blocked send fails) or
//! after sending an error; a panic on it becomes an error in the stream, so the consumer never
//! mistakes it for the end of the data.

use std::sync::mpsc::{sync_channel, Receiver};

use anyhow::{anyhow, Result};

use crate::data::encoded::EncodedSet;
use crate::data::sampler::EpochBatcher;
use crate::model::bert::HostBatch;

/// How many items the producer may be ahead of the consumer: enough to hide a slow step of
/// sampling (an epoch's start), few enough that the memory it holds stays small.
pub const AHEAD: usize = 4;

/// Runs `consume` on this thread over `items`, which a scoped thread computes at most `ahead`
/// items in advance. Returns what `consume` returns, once the producer has stopped.
pub fn prefetch<T, R>(
    ahead: usize,
    items: impl Iterator<Item = Result<T>> + Send,
    consume: impl FnOnce(&mut dyn Iterator<Item = Result<T>>) -> Result<R>,
) -> Result<R>
where
    T: Send,
{
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel(ahead.max(1));
        scope.spawn(move || {
            let mut items = items;
            loop {
                let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| items.next()))
                    .unwrap_or_else(|_| Some(Err(anyhow!("the batch-building thread panicked"))));
                let Some(item) = next else { return };
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        });
        // `rx` is dropped when `consume` returns, which ends the producer before the scope
        // waits for it.
        consume(&mut Received { rx })
    })
}

struct Received<T> {
    rx: Receiver<Result<T>>,
}

impl<T> Iterator for Received<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        // Disconnected: the producer has sent everything.
        self.rx.recv().ok()
    }
}

/// One optimizer step's micro-batches, and where the step lies in its epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct HostStep {
    pub epoch: u64,
    /// The step's index in its epoch (0-based).
    pub index: u64,
    pub steps_in_epoch: u64,
    /// Micro-batches in the epoch: with a token budget, each epoch has its own count.
    pub micro_in_epoch: u64,
    pub micro_batches: Vec<HostBatch>,
}

impl HostStep {
    pub fn ends_epoch(&self) -> bool {
        self.index + 1 == self.steps_in_epoch
    }
}

/// The training steps from step `step_in_epoch` of epoch `epoch` (a resumed run's position) to
/// the end of epoch `epochs - 1`: each epoch's micro-batches (`batcher`) in groups of
/// `accumulation`, their rows gathered from `set` and packed.
pub fn train_steps<'a>(
    set: &'a EncodedSet,
    batcher: EpochBatcher<'a>,
    accumulation: usize,
    (epoch, step_in_epoch): (u64, u64),
    epochs: u64,
) -> impl Iterator<Item = Result<HostStep>> + Send + 'a {
    let accumulation = accumulation.max(1);
    (epoch..epochs).flat_map(move |e| {
        let micro = batcher.micro_batches(e);
        let micro_in_epoch = micro.len() as u64;
        let steps_in_epoch = micro.len().div_ceil(accumulation) as u64;
        let skip = if e == epoch { step_in_epoch } else { 0 };
        (skip..steps_in_epoch).map(move |index| {
            let first = index as usize * accumulation;
            let group = &micro[first..(first + accumulation).min(micro.len())];
            Ok(HostStep {
                epoch: e,
                index,
                steps_in_epoch,
                micro_in_epoch,
                micro_batches: group
                    .iter()
                    .map(|rows| packed_rows(set, rows))
                    .collect::<Result<_>>()?,
            })
        })
    })
}

/// Evaluation's batches: `chunks` of `set`'s rows, in order, packed.
pub fn eval_batches<'a>(
    set: &'a EncodedSet,
    chunks: &'a [Vec<usize>],
) -> impl Iterator<Item = Result<HostBatch>> + Send + 'a {
    chunks.iter().map(|rows| packed_rows(set, rows))
}

/// The rows `rows` of `set`, packed: no padding rows, which cost compute and change no result.
fn packed_rows(set: &EncodedSet, rows: &[usize]) -> Result<HostBatch> {
    let (ids, types, labels) = set.rows(rows);
    HostBatch::packed(&ids, &types, labels.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sampler::{Batching, Sampling};

    fn set(n: usize) -> EncodedSet {
        let ids: Vec<Vec<u32>> = (0..n)
            .map(|i| (0..(i * 7 % 11 + 1) as u32).map(|t| t + i as u32).collect())
            .collect();
        EncodedSet {
            type_ids: ids
                .iter()
                .map(|s| vec![(s.len() % 2) as u32; s.len()])
                .collect(),
            ids,
            labels: Some((0..n as u32).map(|i| i % 3).collect()),
        }
    }

    fn batcher(lengths: &[usize], batching: Batching) -> EpochBatcher<'_> {
        EpochBatcher {
            sampling: Sampling::Random,
            seed: 7,
            lengths,
            group_size: 6,
            batching,
        }
    }

    /// What the trainer built inline before: every epoch's micro-batches in groups of
    /// `accumulation`, each packed from its rows.
    fn inline_steps(set: &EncodedSet, b: EpochBatcher, accum: usize, epochs: u64) -> Vec<HostStep> {
        let mut out = Vec::new();
        for epoch in 0..epochs {
            let micro = b.micro_batches(epoch);
            let groups: Vec<&[Vec<usize>]> = micro.chunks(accum).collect();
            for (index, group) in groups.iter().enumerate() {
                let micro_batches = group
                    .iter()
                    .map(|rows| {
                        let (ids, types, labels) = set.rows(rows);
                        HostBatch::packed(&ids, &types, labels.as_deref()).unwrap()
                    })
                    .collect();
                out.push(HostStep {
                    epoch,
                    index: index as u64,
                    steps_in_epoch: groups.len() as u64,
                    micro_in_epoch: micro.len() as u64,
                    micro_batches,
                });
            }
        }
        out
    }

    #[test]
    fn prefetched_steps_are_the_inline_ones_from_any_position() {
        let set = set(41);
        let lengths = set.lengths();
        for batching in [
            Batching::Rows {
                size: 3,
                drop_last: false,
            },
            Batching::Tokens {
                max_tokens: 20,
                max_rows: 4,
            },
        ] {
            let b = batcher(&lengths, batching);
            let want = inline_steps(&set, b, 2, 3);
            let all: Vec<HostStep> =
                prefetch(AHEAD, train_steps(&set, b, 2, (0, 0), 3), |s| s.collect()).unwrap();
            assert_eq!(all, want, "{batching:?}");
            // Resumed mid-epoch: the stream starts at that step.
            let at = want
                .iter()
                .position(|s| s.epoch == 1 && s.index == 3)
                .unwrap();
            let resumed: Vec<HostStep> =
                prefetch(AHEAD, train_steps(&set, b, 2, (1, 3), 3), |s| s.collect()).unwrap();
            assert_eq!(resumed, want[at..], "{batching:?}");
        }
    }

    #[test]
    fn eval_batches_are_the_chunks_in_order() {
        let set = set(10);
        let chunks = vec![vec![0, 1, 2], vec![3], vec![4, 5, 6, 7, 8, 9]];
        let got: Vec<HostBatch> =
            prefetch(1, eval_batches(&set, &chunks), |s| s.collect()).unwrap();
        assert_eq!(got.len(), 3);
        for (batch, rows) in got.iter().zip(&chunks) {
            assert_eq!(
                batch.labels,
                Some(rows.iter().map(|&r| r as u32 % 3).collect())
            );
            let ids: Vec<u32> = rows.iter().flat_map(|&r| set.ids[r].clone()).collect();
            assert_eq!(batch.ids, ids);
        }
    }

    #[test]
    fn a_consumer_that_stops_early_ends_an_endless_producer() {
        let taken = prefetch(2, (0u64..).map(Ok), |s| {
            s.take(5).collect::<Result<Vec<u64>>>()
        })
        .unwrap();
        assert_eq!(taken, [0, 1, 2, 3, 4]);
        // A consumer's error returns too, with the producer blocked on a full channel.
        let err = prefetch(1, (0u64..).map(Ok), |_| -> Result<()> {
            std::thread::sleep(std::time::Duration::from_millis(20));
            Err(anyhow!("stopped"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stopped");
    }

    #[test]
    fn producer_errors_and_panics_arrive_in_order_and_end_the_stream() {
        let items = (0..10u32).map(|i| match i {
            3 => Err(anyhow!("bad row 3")),
            _ => Ok(i),
        });
        let got: Vec<String> = prefetch(AHEAD, items, |s| {
            Ok(
                s.map(|r| r.map_or_else(|e| e.to_string(), |v| v.to_string()))
                    .collect(),
            )
        })
        .unwrap();
        assert_eq!(got, ["0", "1", "2", "bad row 3"]);
        let panicking = (0..10u32).map(|i| {
            assert!(i < 2, "row {i}");
            Ok(i)
        });
        let got = prefetch(AHEAD, panicking, |s| Ok(s.collect::<Result<Vec<u32>>>()));
        let err = got.unwrap().unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
    }
}
