//! `bertft-cuda inspect`: what a model folder holds, and what it predicts for a text.

use anyhow::{Context, Result};
use clap::Args;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::cli::load::{load_model, resolve_model_dir, LoadedModel};
use crate::model::bert::{Activations, Batch, Mode};
use crate::model::Classifier;

#[derive(Args)]
pub struct InspectArgs {
    /// A Hugging Face model folder (config.json, model.safetensors, tokenizer files), or a hub id.
    #[arg(long)]
    model: String,
    /// A text to classify.
    #[arg(long)]
    text: Option<String>,
    /// The second text of a pair.
    #[arg(long, requires = "text")]
    text_pair: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_seq_length: usize,
    /// Seed of the initialization of a missing pooler or classifier.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let dir = resolve_model_dir(&args.model)?;
    let LoadedModel {
        cfg,
        layout,
        flat,
        tokenizer,
        ..
    } = load_model(&dir, args.seed)?;
    println!(
        "{}: {} layers, hidden {}, {} heads of {}, intermediate {}, {}, {} labels ({}), {} parameters",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.intermediate_size,
        cfg.hidden_act_name,
        cfg.num_labels(),
        cfg.id2label.join(", "),
        layout.total
    );
    let Some(text) = &args.text else {
        return Ok(());
    };
    let max_len = args.max_seq_length.min(cfg.max_position_embeddings);
    let enc = tokenizer
        .encode(text, args.text_pair.as_deref(), max_len)
        .context("tokenizing --text")?;
    let be = CpuBackend::FP32;
    let model = Classifier::new(&be, cfg, &flat)?;
    let batch = Batch::padded(&be, &[&enc.ids], &[&enc.type_ids], None, tokenizer.pad_id())?;
    let acts = Activations::new(&be, &model.cfg, batch.rows(), batch.size())?;
    model.bert(&be).forward(&batch, &acts, Mode::Eval)?;
    let logits = be.download(&acts.logits)?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|z| (z - max).exp()).collect();
    let probs: Vec<f32> = exps.iter().map(|e| e / exps.iter().sum::<f32>()).collect();
    let best = (0..probs.len())
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .unwrap_or(0);
    println!(
        "{} tokens; label {} ({:.4}); logits {:?}; probs {:?}",
        enc.ids.len(),
        model.cfg.id2label[best],
        probs[best],
        logits,
        probs
    );
    Ok(())
}
