//! The CPU backend against PyTorch + transformers (fixtures from tests/fixtures/make_fixtures.py).
//!
//! Tolerances (fp32 on both sides; the differences are summation-order noise):
//! - logits, hidden states, pooled output: ≤ 1e-4 absolute;
//! - losses: ≤ 1e-5 absolute;
//! - each parameter's gradient: max |ours − torch| ≤ 1e-4 · max |torch| of that tensor. The key
//!   biases are the exception that proves the rule: softmax is invariant to a shift shared by
//!   all keys, so their exact gradient is 0 and torch stores ~1e-10 of rounding noise; for them
//!   the scale is floored at 1e-3 · the largest gradient of the model;
//! - weights after 6 AdamW steps with warmup, decay and clipping: ≤ 2e-5 absolute.

mod common;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::Backend;
use bertft_cuda::config::BertConfig;
use bertft_cuda::model::bert::{Activations, Batch, LossSpec, Mode};
use bertft_cuda::model::params::ParamLayout;
use bertft_cuda::model::weights::load_weights;
use bertft_cuda::model::Classifier;
use bertft_cuda::train::optimizer::{AdamW, AdamWConfig};
use bertft_cuda::train::schedule::{Schedule, ScheduleKind};
use bertft_cuda::train::step::{train_step, StepScratch, StepSettings};
use common::fixture::{has_zero_exact_gradient, max_abs, max_abs_diff, Fixture};
use common::fixtures_dir;

fn tiny_model(be: &CpuBackend) -> Classifier<CpuBackend> {
    let dir = fixtures_dir().join("tiny_bert");
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Fixture::open(&dir.join("model.safetensors"));
    let layout = ParamLayout::new(&cfg);
    let mut flat = vec![0.0; layout.total];
    for s in &layout.specs {
        flat[s.offset..s.offset + s.len()].copy_from_slice(&weights.f32(&s.name));
    }
    Classifier::new(be, cfg, &flat).unwrap()
}

fn batch_of(be: &CpuBackend, f: &Fixture, prefix: &str) -> Batch<CpuBackend> {
    let (ids, types, labels) = f.batch(prefix);
    let ids: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let types: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
    Batch::padded(be, &ids, &types, labels.as_deref(), 0).unwrap()
}

fn assert_close(what: &str, ours: &[f32], torch: &[f32], tol: f32) {
    let d = max_abs_diff(ours, torch);
    eprintln!("{what}: max |ours − torch| = {d:.3e}");
    assert!(d <= tol, "{what}: max |ours − torch| = {d:.3e} > {tol:.0e}");
}

#[test]
fn tiny_forward_and_loss_match_torch() {
    let be = CpuBackend::FP32;
    let model = tiny_model(&be);
    let case = Fixture::open(&fixtures_dir().join("tiny_case.safetensors"));
    let batch = batch_of(&be, &case, "");
    let acts = Activations::new(&be, &model.cfg, batch.rows(), batch.size()).unwrap();
    let bert = model.bert(&be);
    bert.forward(&batch, &acts, Mode::Eval).unwrap();
    assert_close(
        "logits",
        &be.download(&acts.logits).unwrap(),
        &case.f32("logits"),
        1e-4,
    );
    assert_close(
        "last_hidden_state",
        &be.download(acts.last_hidden_state()).unwrap(),
        &case.f32("last_hidden_state"),
        1e-4,
    );
    assert_close(
        "pooled",
        &be.download(&acts.pooled).unwrap(),
        &case.f32("pooled"),
        1e-4,
    );
    let mean = |l: Vec<f32>| l.iter().sum::<f32>() / l.len() as f32;
    assert_close(
        "loss",
        &[mean(bert.losses(&batch, &acts, 0.0).unwrap())],
        &case.f32("loss"),
        1e-5,
    );
    assert_close(
        "loss_smooth",
        &[mean(bert.losses(&batch, &acts, 0.1).unwrap())],
        &case.f32("loss_smooth"),
        1e-5,
    );
}

#[test]
fn tiny_gradients_match_torch() {
    let be = CpuBackend::FP32;
    let model = tiny_model(&be);
    let case = Fixture::open(&fixtures_dir().join("tiny_case.safetensors"));
    let batch = batch_of(&be, &case, "");
    let acts = Activations::new(&be, &model.cfg, batch.rows(), batch.size()).unwrap();
    let bert = model.bert(&be);
    bert.forward(&batch, &acts, Mode::Eval).unwrap();
    bert.backward(
        &model.grad_views,
        &batch,
        &acts,
        Mode::Eval,
        LossSpec::mean(0.0, batch.size()),
    )
    .unwrap();
    let grads = be.download(&model.grads).unwrap();
    let largest = model
        .layout
        .specs
        .iter()
        .map(|s| max_abs(&case.f32(&format!("grad.{}", s.name))))
        .fold(0.0, f32::max);
    let mut worst = 0.0f32;
    for s in &model.layout.specs {
        let torch = case.f32(&format!("grad.{}", s.name));
        let ours = &grads[s.offset..s.offset + s.len()];
        let scale = if s.name.ends_with("attention.self.key.bias") {
            max_abs(&torch).max(1e-3 * largest)
        } else {
            max_abs(&torch)
        };
        let d = max_abs_diff(ours, &torch);
        worst = worst.max(d / scale);
        assert!(
            d <= 1e-4 * scale,
            "grad {}: max diff {d:.3e}, relative {:.3e}",
            s.name,
            d / scale
        );
    }
    eprintln!("gradients: worst relative difference {worst:.3e}");
    // The padding row of the word embeddings never gets a gradient (padding_idx).
    assert!(grads[..model.cfg.hidden_size].iter().all(|&g| g == 0.0));
}

#[test]
fn label_smoothing_gradient_matches_torch() {
    let be = CpuBackend::FP32;
    let case = Fixture::open(&fixtures_dir().join("tiny_case.safetensors"));
    let logits = be.upload(&case.f32("logits")).unwrap();
    let labels: Vec<u32> = case.i64("labels").iter().map(|&v| v as u32).collect();
    let dlogits = be.zeros(labels.len() * 3).unwrap();
    be.cross_entropy_backward(
        &dlogits,
        &logits,
        &be.upload_ids(&labels).unwrap(),
        3,
        0.1,
        1.0 / labels.len() as f32,
    )
    .unwrap();
    assert_close(
        "dlogits_smooth",
        &be.download(&dlogits).unwrap(),
        &case.f32("dlogits_smooth"),
        1e-6,
    );
}

#[test]
fn six_adamw_steps_with_warmup_decay_and_clipping_match_torch() {
    let be = CpuBackend::FP32;
    let model = tiny_model(&be);
    let case = Fixture::open(&fixtures_dir().join("tiny_case.safetensors"));
    let steps = Fixture::open(&fixtures_dir().join("tiny_steps.safetensors"));
    let meta = steps.metadata();
    let num = |k: &str| meta[k].parse::<f64>().unwrap();
    let config = AdamWConfig {
        beta1: num("beta1"),
        beta2: num("beta2"),
        eps: num("eps"),
        weight_decay: num("weight_decay"),
    };
    let mut opt = AdamW::new(&be, &model.layout, &model.params, &model.grads, config).unwrap();
    let schedule = Schedule {
        kind: ScheduleKind::Linear,
        base_lr: num("lr"),
        warmup_steps: num("warmup_steps") as u64,
        total_steps: num("num_steps") as u64,
    };
    let settings = StepSettings {
        max_grad_norm: num("max_grad_norm") as f32,
        label_smoothing: 0.0,
        dropout_seed: None,
    };
    let batches = [batch_of(&be, &case, ""), batch_of(&be, &steps, "b_")];
    let mut scratch = StepScratch::new(&be).unwrap();
    let initial = be.download(&model.params).unwrap();
    let (want_loss, want_norm, want_lr) = (
        steps.f32("step_loss"),
        steps.f32("step_grad_norm"),
        steps.f32("step_lr"),
    );
    for s in 0..schedule.total_steps {
        let batch = std::slice::from_ref(&batches[s as usize % 2]);
        let r = train_step(
            &be,
            &model,
            &mut opt,
            &mut scratch,
            batch,
            s,
            schedule.lr(s),
            &settings,
        )
        .unwrap();
        let i = s as usize;
        assert!(
            (r.loss as f32 - want_loss[i]).abs() <= 1e-5,
            "step {s}: loss {} vs {}",
            r.loss,
            want_loss[i]
        );
        assert!(
            (r.grad_norm - want_norm[i]).abs() <= 1e-4 * want_norm[i],
            "step {s}: norm {} vs {}",
            r.grad_norm,
            want_norm[i]
        );
        assert!(
            (r.lr as f32 - want_lr[i]).abs() <= 1e-9,
            "step {s}: lr {} vs {}",
            r.lr,
            want_lr[i]
        );
    }
    let weights = be.download(&model.params).unwrap();
    for s in &model.layout.specs {
        let ours = &weights[s.offset..s.offset + s.len()];
        if has_zero_exact_gradient(&s.name) {
            // Exactly-zero gradient (see the header): AdamW normalizes rounding noise into
            // steps of any sign, in torch as here. Each step moves an element by at most
            // lr·(1−β₁)/√(1−β₂) (|m̂|/√v̂ is bounded by it), so that bounds the drift.
            let bound: f64 = (0..schedule.total_steps)
                .map(|t| schedule.lr(t))
                .sum::<f64>()
                * (1.0 - config.beta1)
                / (1.0 - config.beta2).sqrt();
            let start = &initial[s.offset..s.offset + s.len()];
            assert!(
                max_abs_diff(ours, start) as f64 <= bound,
                "{} drifted beyond AdamW's largest steps",
                s.name
            );
            continue;
        }
        assert_close(
            &format!("after.{}", s.name),
            ours,
            &steps.f32(&format!("after.{}", s.name)),
            2e-5,
        );
    }
}

/// Why the key biases cannot be compared after training: they do not change the output.
#[test]
fn key_biases_do_not_change_the_output() {
    let be = CpuBackend::FP32;
    let model = tiny_model(&be);
    let case = Fixture::open(&fixtures_dir().join("tiny_case.safetensors"));
    let batch = batch_of(&be, &case, "");
    let logits = |m: &Classifier<CpuBackend>| {
        let acts = Activations::new(&be, &m.cfg, batch.rows(), batch.size()).unwrap();
        m.bert(&be).forward(&batch, &acts, Mode::Eval).unwrap();
        be.download(&acts.logits).unwrap()
    };
    let mut flat = be.download(&model.params).unwrap();
    for s in model
        .layout
        .specs
        .iter()
        .filter(|s| has_zero_exact_gradient(&s.name))
    {
        flat[s.offset..s.offset + s.len()]
            .iter_mut()
            .for_each(|v| *v += 0.5);
    }
    let shifted = Classifier::new(&be, model.cfg.clone(), &flat).unwrap();
    assert_close(
        "logits with shifted key biases",
        &logits(&shifted),
        &logits(&model),
        1e-5,
    );
}

/// The real checkpoint all-MiniLM-L6-v2 (a `BertModel`: no `bert.` prefix, no classifier):
/// last hidden state and pooled output of single sentences and pairs, padded, ≤ 1e-4 absolute.
#[test]
fn minilm_hidden_states_match_transformers() {
    let be = CpuBackend::FP32;
    let dir = common::minilm_dir();
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let layout = ParamLayout::new(&cfg);
    let loaded = load_weights(&dir, &cfg, &layout, 0).unwrap();
    let model = Classifier::new(&be, cfg, &loaded.flat).unwrap();
    let case = Fixture::open(&fixtures_dir().join("minilm_case.safetensors"));
    let batch = batch_of(&be, &case, "");
    assert_eq!(
        batch.rows(),
        case.shape("input_ids").iter().product::<usize>()
    );
    let acts = Activations::new(&be, &model.cfg, batch.rows(), batch.size()).unwrap();
    model.bert(&be).forward(&batch, &acts, Mode::Eval).unwrap();
    let hidden = be.download(acts.last_hidden_state()).unwrap();
    assert_close(
        "last_hidden_state",
        &hidden,
        &case.f32("last_hidden_state"),
        1e-4,
    );
    assert_close(
        "pooler_output",
        &be.download(&acts.pooled).unwrap(),
        &case.f32("pooler_output"),
        1e-4,
    );
}
