//! Gradient accumulation: micro-batches of different sizes give the update of one batch of all
//! their rows (the loss is normalized by the rows of the whole accumulated batch).
//! Tolerance 1e-6 absolute on the weights: the two paths differ only in summation order (the
//! key biases excepted: see `has_zero_exact_gradient`).

mod common;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::Backend;
use bertft_cuda::backend::MatmulPrecision;
use bertft_cuda::model::bert::Batch;
use bertft_cuda::model::params::ParamLayout;
use bertft_cuda::model::Classifier;
use bertft_cuda::train::loss_scale::LossScaler;
use bertft_cuda::train::optimizer::{AdamW, AdamWConfig};
use bertft_cuda::train::step::{queue_train_step, StepReport};
use bertft_cuda::train::step::{train_step, StepScratch, StepSettings};
use common::fixture::{has_zero_exact_gradient, max_abs_diff};
use common::tiny::*;

fn batch(be: &CpuBackend, rows: std::ops::Range<usize>) -> Batch<CpuBackend> {
    let (ids, types, labels) = tiny_batch();
    let ids: Vec<&[u32]> = ids[rows.clone()].iter().map(|v| v.as_slice()).collect();
    let types: Vec<&[u32]> = types[rows.clone()].iter().map(|v| v.as_slice()).collect();
    Batch::padded(be, &ids, &types, Some(&labels[rows]), 0).unwrap()
}

fn weights_after(micro_batches: &[Batch<CpuBackend>], steps: u64) -> (Vec<f32>, Vec<f64>) {
    let be = CpuBackend::FP32;
    let cfg = tiny_config("gelu");
    let model = Classifier::new(&be, cfg.clone(), &tiny_weights(&cfg, 3)).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(&be, &model.layout, &model.params, &model.grads, config).unwrap();
    let mut scratch = StepScratch::new(&be).unwrap();
    let settings = StepSettings {
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        dropout_seed: None,
    };
    let losses = (0..steps)
        .map(|s| {
            train_step(
                &be,
                &model,
                &mut opt,
                &mut scratch,
                micro_batches,
                s,
                1e-3,
                &settings,
            )
            .unwrap()
            .loss
        })
        .collect();
    (be.download(&model.params).unwrap(), losses)
}

#[test]
fn accumulated_micro_batches_equal_one_combined_batch() {
    let be = CpuBackend::FP32;
    let (combined, combined_losses) = weights_after(&[batch(&be, 0..4)], 3);
    // 3 + 1 rows: unequal micro-batches, so a plain mean of per-batch means would be wrong.
    let (accumulated, accumulated_losses) = weights_after(&[batch(&be, 0..3), batch(&be, 3..4)], 3);
    let (start, _) = weights_after(&[batch(&be, 0..4)], 0);
    assert!(
        max_abs_diff(&combined, &start) > 1e-4,
        "the steps must move the weights"
    );
    let layout = ParamLayout::new(&tiny_config("gelu"));
    for s in layout
        .specs
        .iter()
        .filter(|s| !has_zero_exact_gradient(&s.name))
    {
        let r = s.offset..s.offset + s.len();
        let d = max_abs_diff(&accumulated[r.clone()], &combined[r]);
        assert!(d <= 1e-6, "{}: diff {d:.3e}", s.name);
    }
    for (a, c) in accumulated_losses.iter().zip(&combined_losses) {
        assert!((a - c).abs() < 1e-6, "loss {a} vs {c}");
    }
}

/// Steps queued and read back later report what steps read back at once report, bit for bit,
/// and leave the same weights, including when the ledger fills up (4 rows per step here, so a
/// 10-row ledger is read back early every second step; 3 steps fill a 3-step one) and when a
/// step has more rows than it holds.
#[test]
fn queued_steps_report_what_immediate_steps_report() {
    let (immediate, _) = queued_matches_immediate(CpuBackend::FP32, None);
    assert!(immediate.iter().all(|r| !r.skipped()));
}

/// The same in fp16 from a loss scale of 2²¹, which overflows for the first steps: queued, the
/// host learns of each skipped step one step late (the next step settles it just before its
/// update, as in the trainer) and the reports, the skips, the weights and AdamW's step count
/// still match the immediate run's.
#[test]
fn queued_fp16_steps_settle_their_overflows_as_immediate_steps_do() {
    let be = CpuBackend::with_matmul_precision(MatmulPrecision::F16);
    let (immediate, steps_taken) = queued_matches_immediate(be, Some(2f64.powi(21)));
    let skipped = immediate.iter().filter(|r| r.skipped()).count();
    assert!(
        (1..7).contains(&skipped),
        "the test needs some skipped and some taken steps, got {skipped} skipped of 7"
    );
    assert_eq!(steps_taken, 7 - skipped as u64);
}

fn bits(reports: &[StepReport]) -> Vec<(u64, u32, u64, String)> {
    reports
        .iter()
        .map(|r| {
            let change = format!("{:?}", r.scale_change);
            (
                r.loss.to_bits(),
                r.grad_norm.to_bits(),
                r.lr.to_bits(),
                change,
            )
        })
        .collect()
}

/// Runs 7 steps immediately and queued with several ledger sizes; asserts they agree and
/// returns the immediate run's reports and its AdamW step count.
fn queued_matches_immediate(be: CpuBackend, initial_scale: Option<f64>) -> (Vec<StepReport>, u64) {
    let cfg = tiny_config("gelu");
    let settings = StepSettings {
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        dropout_seed: Some(5),
    };
    let run = |queued: Option<(usize, usize)>| -> (Vec<StepReport>, Vec<f32>, u64) {
        let model = Classifier::new(&be, cfg.clone(), &tiny_weights(&cfg, 3)).unwrap();
        let mut opt = AdamW::new(
            &be,
            &model.layout,
            &model.params,
            &model.grads,
            AdamWConfig::default(),
        )
        .unwrap();
        let mut scratch = match queued {
            Some((rows, steps)) => StepScratch::with_ledger_capacity(&be, rows, steps).unwrap(),
            None => StepScratch::new(&be).unwrap(),
        };
        if let Some(scale) = initial_scale {
            let scaler = LossScaler {
                scale,
                growth_tracker: 0,
            };
            scratch.set_loss_scaler(&be, scaler).unwrap();
        }
        let micro = [batch(&be, 0..3), batch(&be, 3..4)];
        let mut reports = Vec::new();
        for s in 0..7u64 {
            // As a schedule: a function of AdamW's step count, which leaves skipped steps out
            // (queued, it is only known once the step before is settled).
            let schedule = |taken: u64| 1e-3 * (taken + 1) as f64;
            if queued.is_some() {
                queue_train_step(
                    &be,
                    &model,
                    &mut opt,
                    &mut scratch,
                    &micro,
                    2 * s,
                    &schedule,
                    &settings,
                )
                .unwrap();
                if s == 4 {
                    reports.extend(scratch.take_reports(&be, &mut opt).unwrap());
                }
            } else {
                let lr = schedule(opt.step);
                reports.push(
                    train_step(
                        &be,
                        &model,
                        &mut opt,
                        &mut scratch,
                        &micro,
                        2 * s,
                        lr,
                        &settings,
                    )
                    .unwrap(),
                );
            }
        }
        reports.extend(scratch.take_reports(&be, &mut opt).unwrap());
        (reports, be.download(&model.params).unwrap(), opt.step)
    };
    let (immediate, weights, steps_taken) = run(None);
    assert_eq!(immediate.len(), 7);
    assert!(immediate.windows(2).all(|w| w[0].loss != w[1].loss));
    // (3, 100): each 4-row step is over the ledger's rows, which grows.
    for capacity in [(1 << 16, 1 << 12), (10, 100), (100, 3), (3, 100)] {
        let (queued, queued_weights, queued_steps) = run(Some(capacity));
        // Bit for bit (an overflowed step's norm is NaN, which == would never match).
        assert_eq!(bits(&queued), bits(&immediate), "ledger {capacity:?}");
        assert_eq!(queued_weights, weights, "ledger {capacity:?}");
        assert_eq!(queued_steps, steps_taken, "ledger {capacity:?}");
    }
    (immediate, steps_taken)
}
