//! The order of examples and their grouping into batches, epoch by epoch.
//!
//! Stateless: the order of epoch `e` is a pure function of `(seed, e)` (and the lengths), drawn
//! from the counter-based Philox generator, so a run resumed at any step reproduces the order of
//! an uninterrupted run without saving generator state.

use crate::backend::philox::philox4x32_10;

/// How an epoch's examples are ordered (transformers' `RandomSampler`, `SequentialSampler`,
/// `LengthGroupedSampler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    Random,
    Sequential,
    GroupByLength,
}

/// The Philox stream of an epoch's order is `ORDER_STREAM | epoch`. Dropout's streams are
/// `(step << 20) | site` (see `philox::stream_id`), which reach these bits only after 2⁴⁴ steps:
/// the data order and the dropout masks never share bits.
pub const ORDER_STREAM: u64 = 0xDA7A << 48;

/// transformers' `LengthGroupedSampler` sorts megabatches of at most this many batches.
const MEGABATCH_MULT: usize = 50;

/// The indices `0..n` in the order epoch `epoch` visits them.
///
/// `lengths` (one per example, e.g. token counts) is read only by `GroupByLength`, whose
/// `batch_size` is the number of examples per optimizer step as transformers passes it
/// (`per_device_train_batch_size * gradient_accumulation_steps`).
pub fn epoch_order(
    n: usize,
    sampling: Sampling,
    seed: u64,
    epoch: u64,
    lengths: &[usize],
    batch_size: usize,
) -> Vec<usize> {
    match sampling {
        Sampling::Sequential => (0..n).collect(),
        Sampling::Random => permutation(n, seed, epoch),
        Sampling::GroupByLength => {
            assert_eq!(lengths.len(), n, "one length per example");
            group_by_length(permutation(n, seed, epoch), lengths, batch_size)
        }
    }
}

/// Consecutive chunks of `batch_size`; the last, shorter one is kept unless `drop_last`.
pub fn batches(order: &[usize], batch_size: usize, drop_last: bool) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch_size must be positive");
    order
        .chunks(batch_size)
        .filter(|c| !drop_last || c.len() == batch_size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// Consecutive runs of `order` whose token counts (`lengths`, indexed by example) sum to at most
/// `max_tokens`, each of at most `max_rows` examples. An example longer than the budget is a
/// batch on its own: it cannot be split, and dropping it would change the data.
pub fn token_budget_batches(
    order: &[usize],
    lengths: &[usize],
    max_tokens: usize,
    max_rows: usize,
) -> Vec<Vec<usize>> {
    assert!(max_rows > 0, "max_rows must be positive");
    let mut out = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut tokens = 0;
    for &i in order {
        let full = current.len() == max_rows || tokens + lengths[i] > max_tokens;
        if full && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            tokens = 0;
        }
        current.push(i);
        tokens += lengths[i];
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// How consecutive examples are cut into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// `size` examples each (the Trainer's batches); the last, shorter one kept unless
    /// `drop_last`.
    Rows { size: usize, drop_last: bool },
    /// As many examples as hold at most `max_tokens` real tokens together, at most `max_rows`
    /// of them (see [`token_budget_batches`]).
    Tokens { max_tokens: usize, max_rows: usize },
}

impl Batching {
    /// The batches of `order`, in order; `lengths` (per example) is read by `Tokens` only.
    pub fn cut(&self, order: &[usize], lengths: &[usize]) -> Vec<Vec<usize>> {
        match *self {
            Batching::Rows { size, drop_last } => batches(order, size, drop_last),
            Batching::Tokens {
                max_tokens,
                max_rows,
            } => token_budget_batches(order, lengths, max_tokens, max_rows),
        }
    }
}

/// Everything that decides a training epoch's micro-batches, so that those of epoch `e` are a
/// pure function of `e`: a resumed run, or a plan counting steps ahead, recomputes them exactly.
#[derive(Clone, Copy, Debug)]
pub struct EpochBatcher<'a> {
    pub sampling: Sampling,
    pub seed: u64,
    /// Token count per example.
    pub lengths: &'a [usize],
    /// Examples per optimizer step, which `GroupByLength` sorts megabatches by.
    pub group_size: usize,
    pub batching: Batching,
}

impl EpochBatcher<'_> {
    /// Epoch `epoch`'s micro-batches, in the order they are trained on.
    pub fn micro_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let n = self.lengths.len();
        let order = epoch_order(
            n,
            self.sampling,
            self.seed,
            epoch,
            self.lengths,
            self.group_size,
        );
        self.batching.cut(&order, self.lengths)
    }
}

/// A uniformly random permutation of `0..n`: Fisher–Yates, the last slot first.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut words = Words::new(seed, ORDER_STREAM | epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = words.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// transformers' `get_length_grouped_indices` on a permutation: cut it into megabatches of
/// `min(n / (4·batch_size), 50)` batches (at least one), sort each by length, longest first
/// (stably, as Python's `sorted(reverse=True)`), then swap the longest example of all into the
/// very first slot so that an out-of-memory error shows up on the first step, not hours in.
fn group_by_length(perm: Vec<usize>, lengths: &[usize], batch_size: usize) -> Vec<usize> {
    assert!(batch_size > 0, "batch_size must be positive");
    let n = perm.len();
    if n == 0 {
        return perm;
    }
    let mult = (n / (batch_size * 4)).clamp(1, MEGABATCH_MULT);
    let size = mult * batch_size;
    let mut order = perm;
    for mega in order.chunks_mut(size) {
        mega.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    }
    // Each megabatch now starts with its longest; the first such maximum is the one torch.argmax
    // picks on ties.
    let longest = (0..n).step_by(size).fold(0, |best, s| {
        if lengths[order[s]] > lengths[order[best]] {
            s
        } else {
            best
        }
    });
    order.swap(0, longest);
    order
}

/// The 32-bit words of one Philox stream, in order: block `b` gives words `4b .. 4b+4`, with the
/// counter layout of `philox::uniform4`.
struct Words {
    key: [u32; 2],
    stream: u64,
    block: u64,
    buf: [u32; 4],
    used: usize,
}

impl Words {
    fn new(seed: u64, stream: u64) -> Self {
        Words {
            key: [seed as u32, (seed >> 32) as u32],
            stream,
            block: 0,
            buf: [0; 4],
            used: 4,
        }
    }

    fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            let (b, s) = (self.block, self.stream);
            let counter = [b as u32, (b >> 32) as u32, s as u32, (s >> 32) as u32];
            self.buf = philox4x32_10(counter, self.key);
            self.block += 1;
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    fn next_u64(&mut self) -> u64 {
        let lo = self.next_u32() as u64;
        (self.next_u32() as u64) << 32 | lo
    }

    /// A uniform integer in `0..bound`, exactly: Lemire's multiply-shift on 64-bit words, with
    /// the rejection that removes its bias (rarely taken: with probability < bound / 2⁶⁴).
    fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let threshold = bound.wrapping_neg() % bound; // 2⁶⁴ mod bound
        loop {
            let m = self.next_u64() as u128 * bound as u128;
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(order: &[usize], n: usize) -> bool {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        sorted == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn random_orders_are_permutations_of_every_size() {
        for n in [0, 1, 2, 3, 17, 1000] {
            for epoch in 0..3 {
                let order = epoch_order(n, Sampling::Random, 42, epoch, &[], 8);
                assert!(is_permutation(&order, n), "n {n} epoch {epoch}");
            }
        }
    }

    #[test]
    fn random_order_is_a_function_of_seed_and_epoch() {
        let a = permutation(500, 42, 3);
        assert_eq!(a, permutation(500, 42, 3));
        assert_ne!(a, permutation(500, 42, 4));
        assert_ne!(a, permutation(500, 43, 3));
        assert_ne!(a, (0..500).collect::<Vec<_>>());
    }

    /// The orders a resumed run depends on: changing the generator, the stream or the shuffle
    /// changes them, so it must be a deliberate change of this test. The values came from an
    /// independent Python transcription of Philox4x32-10, the stream layout and Lemire's draw.
    #[test]
    fn random_order_is_pinned() {
        assert_eq!(permutation(10, 42, 0), [6, 7, 8, 1, 4, 2, 0, 9, 3, 5]);
        assert_eq!(permutation(10, 42, 1), [0, 7, 2, 1, 6, 4, 8, 3, 5, 9]);
        assert_eq!(permutation(10, 0, 7), [7, 3, 1, 8, 4, 9, 0, 2, 6, 5]);
    }

    /// Every one of the 24 orders of 4 items comes up about equally often across epochs.
    #[test]
    fn random_orders_of_four_are_uniform() {
        let draws = 24_000;
        let mut counts = std::collections::HashMap::new();
        for epoch in 0..draws {
            *counts.entry(permutation(4, 7, epoch)).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 24);
        let expected = draws as f64 / 24.0;
        let chi2: f64 = counts
            .values()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        // 23 degrees of freedom: P(χ² > 60) ≈ 4·10⁻⁵ for a uniform shuffle.
        assert!(chi2 < 60.0, "chi-square {chi2}");
    }

    /// Each item lands in each position equally often (a biased index draw would skew this).
    #[test]
    fn random_positions_are_uniform() {
        let (n, draws) = (10, 20_000u64);
        let mut counts = vec![[0u32; 10]; n];
        for epoch in 0..draws {
            for (pos, &item) in permutation(n, 99, epoch).iter().enumerate() {
                counts[item][pos] += 1;
            }
        }
        let expected = draws as f64 / n as f64;
        let chi2: f64 = counts
            .iter()
            .flatten()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        // 81 degrees of freedom: P(χ² > 140) ≈ 5·10⁻⁵.
        assert!(chi2 < 140.0, "chi-square {chi2}");
    }

    #[test]
    fn below_stays_in_range_for_awkward_bounds() {
        let mut w = Words::new(1, 2);
        for bound in [1u64, 2, 3, 7, (1 << 63) + 1, u64::MAX] {
            for _ in 0..100 {
                assert!(w.below(bound) < bound);
            }
        }
    }

    #[test]
    fn sequential_is_the_identity() {
        assert_eq!(
            epoch_order(5, Sampling::Sequential, 1, 9, &[], 2),
            [0, 1, 2, 3, 4]
        );
    }

    fn lengths(n: usize) -> Vec<usize> {
        (0..n).map(|i| (i * 7919 + 13) % 97 + 1).collect()
    }

    #[test]
    fn group_by_length_sorts_megabatches_and_puts_the_longest_first() {
        let (n, bs) = (1003, 4); // megabatches of min(1003/16, 50)·4 = 200, the last of 3
        let lens = lengths(n);
        let perm = permutation(n, 5, 2);
        let order = epoch_order(n, Sampling::GroupByLength, 5, 2, &lens, bs);
        assert!(is_permutation(&order, n));
        assert_eq!(lens[order[0]], *lens.iter().max().unwrap());
        let size = 200;
        let firsts: Vec<usize> = (0..n).step_by(size).map(|s| order[s]).collect();
        for (m, (got, want)) in order.chunks(size).zip(perm.chunks(size)).enumerate() {
            // Past its head (which the swap may have exchanged), each is sorted, longest first.
            assert!(got[1..].windows(2).all(|w| lens[w[0]] >= lens[w[1]]), "{m}");
            // Same examples as the permutation's chunk, but for the swapped heads.
            let mut a: Vec<usize> = got[1..].to_vec();
            let mut b: Vec<usize> = want
                .iter()
                .copied()
                .filter(|i| !firsts.contains(i))
                .collect();
            a.retain(|i| !firsts.contains(i));
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{m}");
        }
        assert_ne!(
            order,
            epoch_order(n, Sampling::GroupByLength, 5, 3, &lens, bs)
        );
    }

    #[test]
    fn group_by_length_on_tiny_sets_uses_one_batch_per_megabatch() {
        let lens = [3, 9, 1, 4, 4, 8, 2, 7];
        let perm = permutation(8, 11, 0);
        let order = epoch_order(8, Sampling::GroupByLength, 11, 0, &lens, 4);
        // min(8 / 16, 50) = 0 → 1 batch per megabatch: each batch of 4 sorted on its own.
        let mut want = perm.clone();
        for c in want.chunks_mut(4) {
            c.sort_by(|&a, &b| lens[b].cmp(&lens[a]));
        }
        if lens[want[4]] > lens[want[0]] {
            want.swap(0, 4);
        }
        assert_eq!(order, want);
        assert_eq!(lens[order[0]], 9);
    }

    #[test]
    fn group_by_length_keeps_ties_in_permutation_order() {
        let lens = vec![5; 12];
        let order = epoch_order(12, Sampling::GroupByLength, 3, 1, &lens, 2);
        assert_eq!(order, permutation(12, 3, 1));
    }

    #[test]
    fn batches_chunk_and_drop_the_last_partial_on_request() {
        let order: Vec<usize> = (0..10).collect();
        let sizes = |b: &[Vec<usize>]| b.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes(&batches(&order, 4, false)), [4, 4, 2]);
        assert_eq!(sizes(&batches(&order, 4, true)), [4, 4]);
        assert_eq!(sizes(&batches(&order, 5, true)), [5, 5]);
        assert_eq!(sizes(&batches(&order, 16, false)), [10]);
        assert!(batches(&order, 16, true).is_empty());
        assert!(batches(&[], 3, false).is_empty());
        assert_eq!(batches(&order, 4, false)[2], [8, 9]);
        assert_eq!(batches(&[7, 3, 5], 2, false), [vec![7, 3], vec![5]]);
    }

    fn tokens(batch: &[usize], lens: &[usize]) -> usize {
        batch.iter().map(|&i| lens[i]).sum()
    }

    #[test]
    fn token_budget_batches_fill_greedily_within_the_budget() {
        let lens = [4, 3, 5, 2, 2, 6, 1];
        let order: Vec<usize> = (0..7).collect();
        let got = token_budget_batches(&order, &lens, 8, 100);
        // 4+3 (5 would make 12), 5+2 (then 2 makes 9), 2+6, 1.
        assert_eq!(got, [vec![0, 1], vec![2, 3], vec![4, 5], vec![6]]);
        // A budget met exactly is still within it.
        assert_eq!(token_budget_batches(&[0, 2], &lens, 9, 100), [vec![0, 2]]);
    }

    #[test]
    fn token_budget_keeps_an_oversized_sequence_alone() {
        let lens = [3, 20, 2, 2];
        let got = token_budget_batches(&[0, 1, 2, 3], &lens, 10, 100);
        assert_eq!(got, [vec![0], vec![1], vec![2, 3]]);
        // Every sequence longer than the budget: one each.
        assert_eq!(
            token_budget_batches(&[1, 0], &lens, 1, 100),
            [vec![1], vec![0]]
        );
    }

    #[test]
    fn token_budget_is_capped_by_rows() {
        let lens = [1; 10];
        let sizes = |b: Vec<Vec<usize>>| b.iter().map(Vec::len).collect::<Vec<_>>();
        let order: Vec<usize> = (0..10).collect();
        assert_eq!(
            sizes(token_budget_batches(&order, &lens, 100, 4)),
            [4, 4, 2]
        );
        assert_eq!(
            sizes(token_budget_batches(&order, &lens, 3, 4)),
            [3, 3, 3, 1]
        );
        assert!(token_budget_batches(&[], &lens, 3, 4).is_empty());
    }

    fn budget_batcher(lens: &[usize], sampling: Sampling) -> EpochBatcher<'_> {
        EpochBatcher {
            sampling,
            seed: 42,
            lengths: lens,
            group_size: 8,
            batching: Batching::Tokens {
                max_tokens: 150,
                max_rows: 8,
            },
        }
    }

    #[test]
    fn budget_epochs_visit_every_example_once_within_budget_and_cap() {
        let lens = lengths(1003);
        for sampling in [
            Sampling::Random,
            Sampling::Sequential,
            Sampling::GroupByLength,
        ] {
            let batcher = budget_batcher(&lens, sampling);
            for epoch in 0..3 {
                let micro = batcher.micro_batches(epoch);
                let flat: Vec<usize> = micro.concat();
                assert!(is_permutation(&flat, lens.len()), "{sampling:?} {epoch}");
                // The batches are the epoch's order cut in consecutive runs.
                let order = epoch_order(lens.len(), sampling, 42, epoch, &lens, 8);
                assert_eq!(flat, order, "{sampling:?} {epoch}");
                for b in &micro {
                    assert!(!b.is_empty() && b.len() <= 8);
                    assert!(b.len() == 1 || tokens(b, &lens) <= 150, "{b:?}");
                }
                // Greedy: no batch could have taken the next example too.
                for w in micro.windows(2) {
                    let next = lens[w[1][0]];
                    assert!(w[0].len() == 8 || tokens(&w[0], &lens) + next > 150);
                }
            }
        }
    }

    #[test]
    fn budget_epochs_are_a_function_of_seed_and_epoch() {
        let lens = lengths(500);
        let batcher = budget_batcher(&lens, Sampling::Random);
        let a = batcher.micro_batches(3);
        assert_eq!(a, batcher.micro_batches(3));
        assert_ne!(a, batcher.micro_batches(4));
        let other_seed = EpochBatcher {
            seed: 43,
            ..batcher
        };
        assert_ne!(a, other_seed.micro_batches(3));
    }

    #[test]
    fn rows_batching_is_the_trainers_batches() {
        let lens = lengths(37);
        let order = permutation(37, 1, 0);
        for drop_last in [false, true] {
            let rows = Batching::Rows { size: 5, drop_last };
            assert_eq!(rows.cut(&order, &lens), batches(&order, 5, drop_last));
        }
    }
}
