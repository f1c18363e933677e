//! One MiniLM-L6 training step on the CPU backend: batch 8, sequence 128 (every token real),
//! dropout on, loss, backward, global-norm clipping and AdamW — what `trainer.train()` does
//! per step. Baseline (the issue's): PyTorch eager on the same 2-core machine, 0.76 s per step.
//!
//! Needs the all-MiniLM-L6-v2 folder: `BERTFT_MINILM_DIR`, or target/test-assets/ as
//! tests/run.sh leaves it.

use std::time::Duration;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::philox::uniform;
use bertft_cuda::config::BertConfig;
use bertft_cuda::model::bert::Batch;
use bertft_cuda::model::params::ParamLayout;
use bertft_cuda::model::weights::load_weights;
use bertft_cuda::model::Classifier;
use bertft_cuda::train::optimizer::{AdamW, AdamWConfig};
use bertft_cuda::train::step::{train_step, StepScratch, StepSettings};
use criterion::{criterion_group, criterion_main, Criterion};

#[path = "../tests/common/mod.rs"]
mod common;
use common::minilm_dir;

const BATCH: usize = 8;
const SEQ: usize = 128;

fn train_step_minilm(c: &mut Criterion) {
    let be = CpuBackend::FP32;
    let dir = minilm_dir();
    let mut cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    cfg.set_labels(vec!["negative".into(), "positive".into()]);
    let layout = ParamLayout::new(&cfg);
    let flat = load_weights(&dir, &cfg, &layout, 42).unwrap().flat;
    let model = Classifier::new(&be, cfg.clone(), &flat).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(&be, &model.layout, &model.params, &model.grads, config).unwrap();
    let mut scratch = StepScratch::new(&be).unwrap();

    // [CLS] random word pieces [SEP], all 128 positions real.
    let ids: Vec<Vec<u32>> = (0..BATCH)
        .map(|b| {
            let mut row: Vec<u32> = (0..SEQ)
                .map(|t| 1000 + (uniform(7, b as u64, t as u64) * 28000.0) as u32)
                .collect();
            (row[0], row[SEQ - 1]) = (101, 102);
            row
        })
        .collect();
    let types = vec![vec![0u32; SEQ]; BATCH];
    let labels: Vec<u32> = (0..BATCH as u32).map(|b| b % 2).collect();
    let id_refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let type_refs: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
    let batch = Batch::padded(&be, &id_refs, &type_refs, Some(&labels), 0).unwrap();
    let settings = StepSettings {
        max_grad_norm: 1.0,
        label_smoothing: 0.0,
        dropout_seed: Some(42),
    };

    let mut step = 0u64;
    let mut group = c.benchmark_group("cpu");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("minilm_train_step_b8_s128", |b| {
        b.iter(|| {
            train_step(
                &be,
                &model,
                &mut opt,
                &mut scratch,
                std::slice::from_ref(&batch),
                step,
                2e-5,
                &settings,
            )
            .unwrap();
            step += 1;
        })
    });
    group.finish();
}

criterion_group!(benches, train_step_minilm);
criterion_main!(benches);
