//! Batches formed by a token budget (`--max-tokens-per-batch`) compute what row-count batches of
//! the same rows compute: the loss is the mean over every row of the accumulated batch, and
//! predictions come out in input order.

mod common;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::{Backend, IGNORE_LABEL};
use bertft_cuda::data::encoded::EncodedSet;
use bertft_cuda::data::sampler::Batching;
use bertft_cuda::model::bert::{
    row_bucket, sequence_bucket, Batch, HostBatch, MAX_BATCH_SEQUENCES, MAX_SEQUENCE_ROWS,
};
use bertft_cuda::model::Classifier;
use bertft_cuda::train::evaluate::{eval_metrics, predict, Predictions};
use bertft_cuda::train::optimizer::{AdamW, AdamWConfig};
use bertft_cuda::train::step::{train_step, ActivationCache, StepScratch, StepSettings};
use common::fixture::max_abs_diff;
use common::tiny::*;

/// The four rows of `tiny_batch` (7, 3, 6 and 1 tokens) as a dataset.
fn tiny_set() -> EncodedSet {
    let (ids, type_ids, labels) = tiny_batch();
    EncodedSet {
        ids,
        type_ids,
        labels: Some(labels),
    }
}

fn tiny_model(be: &CpuBackend) -> Classifier<CpuBackend> {
    let cfg = tiny_config("gelu");
    Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 3)).unwrap()
}

/// One optimizer step over `micro_batches` (rows of `set`) from the same starting weights:
/// the loss, and the gradients it left (unclipped, without dropout).
fn one_step(set: &EncodedSet, micro_batches: &[Vec<usize>]) -> (f64, Vec<f32>) {
    step_over(None, |be| {
        micro_batches
            .iter()
            .map(|rows| {
                let (ids, types, labels) = set.rows(rows);
                Batch::packed(be, &ids, &types, labels.as_deref()).unwrap()
            })
            .collect()
    })
}

/// One unclipped optimizer step from the same starting weights over the micro-batches `batches`
/// makes, with dropout drawn from `dropout_seed`: the loss and the gradients it left.
fn step_over(
    dropout_seed: Option<u64>,
    batches: impl FnOnce(&CpuBackend) -> Vec<Batch<CpuBackend>>,
) -> (f64, Vec<f32>) {
    let be = CpuBackend::FP32;
    let model = tiny_model(&be);
    let mut opt = AdamW::new(
        &be,
        &model.layout,
        &model.params,
        &model.grads,
        AdamWConfig::default(),
    )
    .unwrap();
    let mut scratch = StepScratch::new(&be).unwrap();
    let settings = StepSettings {
        max_grad_norm: 0.0,
        label_smoothing: 0.1,
        dropout_seed,
    };
    let batches = batches(&be);
    let report = train_step(
        &be,
        &model,
        &mut opt,
        &mut scratch,
        &batches,
        0,
        1e-3,
        &settings,
    )
    .unwrap();
    (report.loss, be.download(&model.grads).unwrap())
}

#[test]
fn budget_batches_give_the_loss_and_gradients_of_one_batch_of_their_rows() {
    let set = tiny_set();
    let order = [0, 1, 2, 3];
    let budget = Batching::Tokens {
        max_tokens: 9,
        max_rows: 8,
    };
    // 7 | 3 + 6 | 1: the 1-token row would make the middle batch 10 tokens.
    let budget_batches = budget.cut(&order, &set.lengths());
    assert_eq!(budget_batches, [vec![0], vec![1, 2], vec![3]]);
    let fixed = Batching::Rows {
        size: 4,
        drop_last: false,
    }
    .cut(&order, &set.lengths());
    assert_eq!(fixed, [vec![0, 1, 2, 3]]);

    let (budget_loss, budget_grads) = one_step(&set, &budget_batches);
    let (fixed_loss, fixed_grads) = one_step(&set, &fixed);
    assert!(
        (budget_loss - fixed_loss).abs() < 1e-6,
        "loss {budget_loss} vs {fixed_loss}"
    );
    assert!(budget_grads.iter().any(|&g| g.abs() > 1e-3));
    let d = max_abs_diff(&budget_grads, &fixed_grads);
    assert!(d <= 1e-6, "gradients differ by {d:.3e}");
}

#[test]
fn budget_predictions_stay_in_input_order() {
    let be = CpuBackend::FP32;
    let model = tiny_model(&be);
    // Rows of 7, 3, 6, 1, 7, 3, 6, 1 tokens: batches of 7 | 3 6 | 1 7 | 3 6 | 1 tokens.
    let mut set = tiny_set();
    set.ids.extend(set.ids.clone());
    set.type_ids.extend(set.type_ids.clone());
    set.labels = Some([2, 0, 1, 2, 1, 1, 0, 2].to_vec());
    let budget = Batching::Tokens {
        max_tokens: 9,
        max_rows: 2,
    };
    let one_by_one = Batching::Rows {
        size: 1,
        drop_last: false,
    };
    let mut acts = ActivationCache::default();
    let by_budget = predict(&be, &model, &mut acts, &set, budget, 0.0).unwrap();
    let by_row = predict(&be, &model, &mut acts, &set, one_by_one, 0.0).unwrap();
    assert_eq!(by_budget.batches, 5);
    assert_eq!(by_row.batches, 8);
    assert_eq!(by_budget.logits.len(), 8);
    for (r, (a, b)) in by_budget.logits.iter().zip(&by_row.logits).enumerate() {
        assert!(max_abs_diff(a, b) < 1e-5, "row {r}: {a:?} vs {b:?}");
    }
    // The rows differ, so a reordering would show.
    assert!(max_abs_diff(&by_row.logits[0], &by_row.logits[1]) > 1e-3);
    let loss = |p: &bertft_cuda::train::evaluate::Predictions| p.loss.unwrap();
    assert!((loss(&by_budget) - loss(&by_row)).abs() < 1e-6);
}

/// Loss and gradients of one step (dropout on) over the four tiny rows, packed, with the
/// packed batch first padded to `total_rows` rows when given.
fn packed_step(total_rows: Option<usize>) -> (f64, Vec<f32>) {
    step_over(Some(3), |be| {
        let (ids, types, labels) = tiny_batch();
        let ids: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let types: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
        let mut host = HostBatch::packed(&ids, &types, Some(&labels)).unwrap();
        if let Some(n) = total_rows {
            let pad_id = tiny_config("gelu").pad_token_id.unwrap_or(0);
            host.pad_rows_to(n, pad_id);
            assert_eq!(host.layout.total_rows(), n);
            assert_eq!(host.layout.valid, [7, 3, 6, 1]);
        }
        vec![Batch::upload(be, host).unwrap()]
    })
}

/// A packed batch padded to a row bucket (as steps run as CUDA graphs are) computes the loss and
/// the gradients of the unpadded batch: its padding rows are never attended to and get exactly
/// zero gradient; only the summation length of the weight gradients changes (fp32 order).
#[test]
fn a_batch_padded_to_its_row_bucket_computes_what_the_packed_batch_does() {
    assert_eq!(
        [0, 1, 17, 64, 65, 511, 512, 513, 1000, 4096, 4097].map(row_bucket),
        [0, 64, 64, 64, 128, 512, 512, 576, 1024, 4096, 4608]
    );
    let (loss, grads) = packed_step(None);
    let (bucketed_loss, bucketed_grads) = packed_step(Some(row_bucket(17)));
    assert!(
        (loss - bucketed_loss).abs() <= 1e-6 * loss.abs(),
        "loss {loss} vs {bucketed_loss}"
    );
    assert!(grads.iter().any(|&g| g.abs() > 1e-3));
    let d = max_abs_diff(&grads, &bucketed_grads);
    assert!(d <= 1e-6, "gradients differ by {d:.3e}");
}

#[test]
fn sequence_buckets_are_few_and_close_above() {
    assert_eq!(
        [0, 1, 4, 8, 9, 63, 64, 65, 73, 127, 128, 129, 145, 1000, 1024, 1025].map(sequence_bucket),
        [0, 8, 8, 8, 16, 64, 64, 72, 80, 128, 128, 144, 160, 1024, 1024, 1152]
    );
    let mut previous = 0;
    for n in 1..=5000 {
        let b = sequence_bucket(n);
        assert!(b >= n && b >= previous, "bucket {b} of {n}");
        // At most 7 dummies, or 12.5% of the sequences.
        assert!(b - n <= 7.max(n / 8), "bucket {b} of {n}");
        assert_eq!(sequence_bucket(b), b, "a bucket is its own bucket");
        assert_eq!(b % 8, 0);
        previous = b;
    }
    // Eight buckets per octave (beyond the first 64 sequences).
    for lo in [64, 128, 1024] {
        let mut buckets: Vec<usize> = (lo + 1..=2 * lo).map(sequence_bucket).collect();
        buckets.dedup();
        assert_eq!(buckets.len(), 8, "buckets of {}..={}", lo + 1, 2 * lo);
    }
}

/// A packed batch of the tiny set's rows `rows`, padded by `pad`.
fn host_batch(set: &EncodedSet, rows: &[usize], pad: &dyn Fn(&mut HostBatch)) -> HostBatch {
    let (ids, types, labels) = set.rows(rows);
    let mut host = HostBatch::packed(&ids, &types, labels.as_deref()).unwrap();
    pad(&mut host);
    host
}

/// Padding stops at what the attention kernels index (65535 sequences, 65535 rows in one): a
/// batch that big keeps a shape of its own rather than fail for its padding.
#[test]
fn padding_stops_at_the_attention_kernels_limits() {
    // 61441 one-token sequences: their bucket would be 65536.
    let n = 61441;
    assert_eq!(sequence_bucket(n), 65536);
    let ids: Vec<[u32; 1]> = vec![[5]; n];
    let types: Vec<[u32; 1]> = vec![[0]; n];
    let ids: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    let types: Vec<&[u32]> = types.iter().map(|r| &r[..]).collect();
    let mut host = HostBatch::packed(&ids, &types, None).unwrap();
    host.pad_to_buckets(0);
    assert_eq!(host.size(), MAX_BATCH_SEQUENCES);
    // The last sequence takes the row padding, up to 65535 rows.
    let long = vec![7u32; MAX_SEQUENCE_ROWS - 10];
    let zeros = vec![0u32; long.len()];
    let mut host = HostBatch::packed(&[&long[..]], &[&zeros[..]], None).unwrap();
    host.pad_rows_to(2 * MAX_SEQUENCE_ROWS, 0);
    assert_eq!(host.layout.rows, vec![MAX_SEQUENCE_ROWS as u32]);
    assert_eq!(host.ids.len(), MAX_SEQUENCE_ROWS);
}

#[test]
fn padding_to_buckets_appends_dummies_then_rows() {
    let pad_id = tiny_config("gelu").pad_token_id.unwrap();
    let set = tiny_set();
    let host = host_batch(&set, &[0, 1, 2, 3], &|h| h.pad_to_buckets(pad_id));
    // 4 sequences → 8 (4 one-token dummies after the 17 rows), 21 rows → 64: the 43 padding
    // rows spread over the dummies (11, 11, 11, 10 more), so none is much longer than the rest.
    assert_eq!((host.size(), host.real_size()), (8, 4));
    assert_eq!(host.layout.total_rows(), 64);
    assert_eq!(host.layout.starts, [0, 7, 10, 16, 17, 29, 41, 53]);
    assert_eq!(host.layout.rows, [7, 3, 6, 1, 12, 12, 12, 11]);
    assert_eq!(host.layout.valid, [7, 3, 6, 1, 1, 1, 1, 1]);
    assert_eq!(
        host.labels.as_deref().unwrap(),
        [
            2,
            0,
            1,
            2,
            IGNORE_LABEL,
            IGNORE_LABEL,
            IGNORE_LABEL,
            IGNORE_LABEL
        ]
    );
    assert_eq!(host.ids.len(), 64);
    assert!(host.ids[17..].iter().all(|&i| i == pad_id));
    assert!(host.positions[17..].iter().all(|&p| p == 0));
    assert!(host.type_ids[17..].iter().all(|&t| t == 0));
    // Padded again: nothing changes (a bucket is its own bucket).
    let mut again = host.clone();
    again.pad_to_buckets(pad_id);
    assert_eq!(again, host);
    // Unlabelled batches get unlabelled dummies.
    let mut unlabelled = HostBatch::packed(&[&[2, 3]], &[&[0, 0]], None).unwrap();
    unlabelled.pad_to_buckets(pad_id);
    assert_eq!((unlabelled.size(), unlabelled.real_size()), (8, 1));
    assert_eq!(unlabelled.labels, None);
    // 8 real sequences, a whole bucket, still get dummies (the bucket above 8 + 1), and those
    // take the row padding: the real sequences keep their rows.
    let eight: Vec<usize> = [0, 1, 2, 3].repeat(2);
    let mut set8 = tiny_set();
    set8.ids = eight.iter().map(|&r| set.ids[r].clone()).collect();
    set8.type_ids = eight.iter().map(|&r| set.type_ids[r].clone()).collect();
    set8.labels = Some(
        eight
            .iter()
            .map(|&r| set.labels.as_ref().unwrap()[r])
            .collect(),
    );
    let full = host_batch(&set8, &(0..8).collect::<Vec<_>>(), &|h| {
        h.pad_to_buckets(pad_id)
    });
    assert_eq!((full.size(), full.real_size()), (16, 8));
    assert_eq!(full.layout.total_rows(), 64);
    assert_eq!(full.layout.valid[..8], [7, 3, 6, 1, 7, 3, 6, 1]);
    assert_eq!(full.layout.rows[..8], [7, 3, 6, 1, 7, 3, 6, 1]);
    assert_eq!(full.layout.rows[8..], [4, 4, 4, 4, 4, 4, 3, 3]);
    // A batch on both buckets (8 sequences of 8 rows) is left as it is.
    let rows8: Vec<Vec<u32>> = (0..8).map(|s| vec![5 + s; 8]).collect();
    let rows8: Vec<&[u32]> = rows8.iter().map(|r| &r[..]).collect();
    let types8 = vec![&[0u32; 8][..]; 8];
    let mut on_buckets = HostBatch::packed(&rows8, &types8, Some(&[1; 8])).unwrap();
    let before = on_buckets.clone();
    on_buckets.pad_to_buckets(pad_id);
    assert_eq!(on_buckets, before);
    // Without dummies (pad_rows_to alone), the last sequence takes them.
    let mut last = host_batch(&set8, &(0..8).collect::<Vec<_>>(), &|_| {});
    last.pad_rows_to(64, pad_id);
    assert_eq!(last.layout.rows[7], 64 - 33);
}

/// Loss and gradients of one step (dropout on, label smoothing 0.1) over `micro_batches` of the
/// tiny rows, each packed and then padded by `pad`.
fn padded_step(micro_batches: &[Vec<usize>], pad: &dyn Fn(&mut HostBatch)) -> (f64, Vec<f32>) {
    let set = tiny_set();
    step_over(Some(3), |be| {
        micro_batches
            .iter()
            .map(|rows| Batch::upload(be, host_batch(&set, rows, pad)).unwrap())
            .collect()
    })
}

/// A packed batch padded to its sequence bucket and then its row bucket (as steps run as CUDA
/// graphs are) computes the loss and the gradients of the unpadded batch, dropout on: the
/// dummies come after the real sequences (the real ones draw the same dropout and see the same
/// attention), their loss and gradient are exactly 0, and the mean counts the real sequences
/// only. Also over several micro-batches, each padded (the step's loss leaves out the dummies
/// between them). Bit for bit with one micro-batch here; within fp32 rounding in general (the
/// CPU GEMM's kernels depend on the row count, here of the per-sequence GEMMs).
#[test]
fn a_batch_padded_to_its_sequence_and_row_buckets_computes_what_the_packed_batch_does() {
    let pad_id = tiny_config("gelu").pad_token_id.unwrap();
    let bucketed = |h: &mut HostBatch| h.pad_to_buckets(pad_id);
    for micro_batches in [vec![vec![0, 1, 2, 3]], vec![vec![0], vec![1, 2], vec![3]]] {
        let (loss, grads) = padded_step(&micro_batches, &|_| {});
        let (bucketed_loss, bucketed_grads) = padded_step(&micro_batches, &bucketed);
        assert!(
            (loss - bucketed_loss).abs() <= 1e-6 * loss.abs(),
            "{micro_batches:?}: loss {loss} vs {bucketed_loss}"
        );
        assert!(grads.iter().any(|&g| g.abs() > 1e-3));
        let d = max_abs_diff(&grads, &bucketed_grads);
        assert!(d <= 1e-6, "{micro_batches:?}: gradients differ by {d:.3e}");
    }
}

/// Predictions (logits, loss, metrics) with every batch padded to its buckets, as evaluation
/// with CUDA graphs pads them, are those of the unpadded batches up to fp32 rounding (the CPU
/// GEMM's kernels depend on the row count): the dummies' logits and losses are dropped.
#[test]
fn evaluation_padded_to_buckets_gives_the_same_predictions_and_metrics() {
    let model = tiny_model(&CpuBackend::FP32);
    let labels = [2, 0, 1, 2, 1, 1, 0, 2];
    let run = |be: &CpuBackend, batching: Batching, labelled: bool| -> Predictions {
        let mut set = tiny_set();
        set.ids.extend(set.ids.clone());
        set.type_ids.extend(set.type_ids.clone());
        set.labels = labelled.then(|| labels.to_vec());
        predict(
            be,
            &model,
            &mut ActivationCache::default(),
            &set,
            batching,
            0.1,
        )
        .unwrap()
    };
    let padding = CpuBackend::FP32.with_bucket_padding();
    for batching in [
        Batching::Tokens {
            max_tokens: 9,
            max_rows: 2,
        },
        Batching::Rows {
            size: 3,
            drop_last: false,
        },
    ] {
        for labelled in [true, false] {
            let plain = run(&CpuBackend::FP32, batching, labelled);
            let padded = run(&padding, batching, labelled);
            assert_eq!(padded.batches, plain.batches);
            assert_eq!(padded.logits.len(), 8);
            for (r, (a, b)) in padded.logits.iter().zip(&plain.logits).enumerate() {
                assert!(max_abs_diff(a, b) <= 1e-6, "row {r}: {a:?} vs {b:?}");
            }
            match (padded.loss, plain.loss) {
                (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}"),
                (None, None) => assert!(!labelled),
                other => panic!("losses {other:?}"),
            }
            if labelled {
                // The loss is compared above; the rest are counts of argmaxes.
                let metrics = |p: &Predictions| {
                    let mut m = eval_metrics(p, &labels, 3);
                    m.retain(|(name, _)| {
                        !["loss", "runtime", "per_second"]
                            .iter()
                            .any(|s| name.contains(s))
                    });
                    m
                };
                assert_eq!(metrics(&padded), metrics(&plain));
            }
        }
    }
}
