//! Batches formed by a token budget (`--max-tokens-per-batch`) compute what row-count batches of
//! the same rows compute: the loss is the mean over every row of the accumulated batch, and
//! predictions come out in input order.

mod common;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::Backend;
use bertft_cuda::data::encoded::EncodedSet;
use bertft_cuda::data::sampler::Batching;
use bertft_cuda::model::bert::{row_bucket, Batch, HostBatch};
use bertft_cuda::model::Classifier;
use bertft_cuda::train::evaluate::predict;
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
