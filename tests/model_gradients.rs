//! The model's backward pass against finite differences of its forward pass, with dropout on,
//! and the padded and packed layouts against each other.
//!
//! Tolerance: central differences in fp32 with step 1e-2 on a loss of order 1 carry a
//! truncation error of order step² and a rounding error of order 1e-7/step, so directional
//! derivatives agree to about 1e-3 relative; 2e-2 leaves margin without hiding a wrong term
//! (a missing or doubled term changes them by far more).

mod common;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::Backend;
use bertft_cuda::model::bert::{Activations, Batch, LossSpec, Mode};
use bertft_cuda::model::Classifier;
use common::tiny::*;

fn batch(be: &CpuBackend, packed: bool) -> Batch<CpuBackend> {
    let (ids, types, labels) = tiny_batch();
    let ids: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let types: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
    if packed {
        Batch::packed(be, &ids, &types, Some(&labels)).unwrap()
    } else {
        Batch::padded(be, &ids, &types, Some(&labels), 0).unwrap()
    }
}

fn mean_loss(model: &Classifier<CpuBackend>, batch: &Batch<CpuBackend>, mode: Mode) -> f64 {
    let be = CpuBackend::FP32;
    let acts = Activations::new(&be, &model.cfg, batch.rows(), batch.size()).unwrap();
    let bert = model.bert(&be);
    bert.forward(batch, &acts, mode).unwrap();
    let l = bert.losses(batch, &acts, 0.1).unwrap();
    l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64
}

fn gradients(model: &Classifier<CpuBackend>, batch: &Batch<CpuBackend>, mode: Mode) -> Vec<f32> {
    let be = CpuBackend::FP32;
    let acts = Activations::new(&be, &model.cfg, batch.rows(), batch.size()).unwrap();
    let bert = model.bert(&be);
    model.zero_grads(&be).unwrap();
    bert.forward(batch, &acts, mode).unwrap();
    bert.backward(
        &model.grad_views,
        batch,
        &acts,
        mode,
        LossSpec::mean(0.1, batch.size()),
    )
    .unwrap();
    be.download(&model.grads).unwrap()
}

fn check_directional_derivatives(act: &str, mode: Mode) {
    let be = CpuBackend::FP32;
    let cfg = tiny_config(act);
    let flat = tiny_weights(&cfg, 1);
    let model = Classifier::new(&be, cfg.clone(), &flat).unwrap();
    let b = batch(&be, false);
    let grads = gradients(&model, &b, mode);
    let step = 1e-2f32;
    for (t, spec) in model.layout.specs.iter().enumerate() {
        let dir = random_vec(spec.len(), 1000 + t as u64, 1.0);
        let analytic: f64 = dir
            .iter()
            .zip(&grads[spec.offset..])
            .map(|(d, g)| (*d as f64) * (*g as f64))
            .sum();
        let loss_at = |sign: f32| {
            let mut moved = flat.clone();
            moved[spec.offset..spec.offset + spec.len()]
                .iter_mut()
                .zip(&dir)
                .for_each(|(w, d)| *w += sign * step * d);
            mean_loss(
                &Classifier::new(&be, cfg.clone(), &moved).unwrap(),
                &b,
                mode,
            )
        };
        let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * step as f64);
        let scale = analytic.abs().max(numeric.abs()).max(1e-3);
        assert!(
            (analytic - numeric).abs() / scale < 2e-2,
            "{act} {mode:?} {}: analytic {analytic:.6e} vs numeric {numeric:.6e}",
            spec.name
        );
    }
}

#[test]
fn gradients_match_finite_differences_gelu_eval() {
    check_directional_derivatives("gelu", Mode::Eval);
}

#[test]
fn gradients_match_finite_differences_gelu_tanh_with_dropout() {
    check_directional_derivatives("gelu_new", Mode::Train { seed: 11, step: 3 });
}

#[test]
fn dropout_changes_the_output_and_depends_on_the_step() {
    let be = CpuBackend::FP32;
    let cfg = tiny_config("gelu");
    let model = Classifier::new(&be, cfg.clone(), &tiny_weights(&cfg, 1)).unwrap();
    let b = batch(&be, false);
    let eval = mean_loss(&model, &b, Mode::Eval);
    let a = mean_loss(&model, &b, Mode::Train { seed: 5, step: 0 });
    let again = mean_loss(&model, &b, Mode::Train { seed: 5, step: 0 });
    let next = mean_loss(&model, &b, Mode::Train { seed: 5, step: 1 });
    assert_eq!(a, again);
    assert_ne!(a, eval);
    assert_ne!(a, next);
}

/// The packed (unpadded) layout computes the same logits and gradients as the padded one.
#[test]
fn packed_equals_padded() {
    let be = CpuBackend::FP32;
    let cfg = tiny_config("gelu");
    let model = Classifier::new(&be, cfg.clone(), &tiny_weights(&cfg, 2)).unwrap();
    let logits = |b: &Batch<CpuBackend>| {
        let acts = Activations::new(&be, &cfg, b.rows(), b.size()).unwrap();
        model.bert(&be).forward(b, &acts, Mode::Eval).unwrap();
        be.download(&acts.logits).unwrap()
    };
    let (padded, packed) = (batch(&be, false), batch(&be, true));
    assert!(packed.rows() < padded.rows());
    for (a, b) in logits(&padded).iter().zip(logits(&packed)) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let (ga, gb) = (
        gradients(&model, &padded, Mode::Eval),
        gradients(&model, &packed, Mode::Eval),
    );
    let max = ga.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in ga.iter().zip(&gb) {
        assert!((a - b).abs() <= 1e-5 * max, "{a} vs {b}");
    }
}

/// Activations handed out by the arena (views of buffers a larger batch used before) give the
/// same results as fresh buffers: no op reads what an earlier batch left behind.
#[test]
fn arena_views_equal_fresh_buffers() {
    use bertft_cuda::model::bert::ActivationArena;
    let be = CpuBackend::FP32;
    let cfg = tiny_config("gelu");
    let model = Classifier::new(&be, cfg.clone(), &tiny_weights(&cfg, 4)).unwrap();
    let (large, small) = (batch(&be, false), batch(&be, true));
    let mode = Mode::Train { seed: 1, step: 2 };
    let run = |acts: &Activations<_>, b: &Batch<CpuBackend>| {
        model.zero_grads(&be).unwrap();
        let bert = model.bert(&be);
        bert.forward(b, acts, mode).unwrap();
        bert.backward(
            &model.grad_views,
            b,
            acts,
            mode,
            LossSpec::mean(0.0, b.size()),
        )
        .unwrap();
        (
            be.download(&acts.logits).unwrap(),
            be.download(&model.grads).unwrap(),
        )
    };
    let fresh = run(
        &Activations::new(&be, &cfg, small.rows(), small.size()).unwrap(),
        &small,
    );
    let mut arena = ActivationArena::default();
    run(
        &arena.get(&be, &cfg, large.rows(), large.size()).unwrap(),
        &large,
    );
    let reused = run(
        &arena.get(&be, &cfg, small.rows(), small.size()).unwrap(),
        &small,
    );
    assert_eq!(fresh, reused);
}
