//! Loading and saving checkpoints: naming variants, storage types, sharding, errors, head
//! initialization, and the real all-MiniLM-L6-v2 checkpoint.

mod common;
use common::TempDir;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use bertft_cuda::backend::philox;
use bertft_cuda::config::BertConfig;
use bertft_cuda::model::init::random_init;
use bertft_cuda::model::params::ParamLayout;
use bertft_cuda::model::weights::{load_weights, save_pretrained};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

const TINY: &str = r#"{"model_type":"bert","vocab_size":30,"hidden_size":12,"num_attention_heads":3,
    "num_hidden_layers":2,"intermediate_size":20,"max_position_embeddings":16,
    "id2label":{"0":"neg","1":"neutral","2":"pos"}}"#;

fn tiny() -> (BertConfig, ParamLayout) {
    let cfg = BertConfig::from_json(TINY).unwrap();
    let layout = ParamLayout::new(&cfg);
    (cfg, layout)
}

/// Distinct values in [-1, 1), so that a tensor landing in the wrong slot is noticed.
fn random_flat(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    (0..layout.total as u64)
        .map(|i| philox::uniform(seed, 0, i) * 2.0 - 1.0)
        .collect()
}

fn slice<'a>(layout: &ParamLayout, flat: &'a [f32], name: &str) -> &'a [f32] {
    let s = layout.get(name).unwrap();
    &flat[s.offset..s.offset + s.len()]
}

struct Raw {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::I32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        _ => unreachable!("the tests write no other type"),
    }
}

/// Every layout tensor of `flat`, renamed by `rename` (`None` leaves it out), stored as `dtype`.
fn tensors_of(
    layout: &ParamLayout,
    flat: &[f32],
    dtype: Dtype,
    rename: impl Fn(&str) -> Option<String>,
) -> Vec<Raw> {
    layout
        .specs
        .iter()
        .filter_map(|s| {
            let name = rename(&s.name)?;
            Some(Raw {
                name,
                dtype,
                shape: s.shape.clone(),
                bytes: encode(slice(layout, flat, &s.name), dtype),
            })
        })
        .collect()
}

fn write_file(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn keep(name: &str) -> Option<String> {
    Some(name.to_string())
}

fn load_err(dir: &Path, cfg: &BertConfig, layout: &ParamLayout) -> String {
    let err = load_weights(dir, cfg, layout, 0).unwrap_err();
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "errors are one line: {msg}");
    msg
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn save_then_load_is_bit_identical() {
    let (cfg, layout) = tiny();
    let mut flat = random_flat(&layout, 1);
    // Values a lossy path would change: signed zero, a subnormal, the extremes.
    flat[..4].copy_from_slice(&[-0.0, f32::MIN_POSITIVE / 3.0, f32::MAX, f32::MIN]);
    let tok = TempDir::new("weights-roundtrip-tok");
    fs::write(
        tok.path().join("vocab.txt"),
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n",
    )
    .unwrap();
    fs::write(
        tok.path().join("tokenizer_config.json"),
        r#"{"do_lower_case": true}"#,
    )
    .unwrap();
    let out = TempDir::new("weights-roundtrip");
    let dir = out.path().join("nested/model"); // created on demand

    save_pretrained(&dir, &cfg, &layout, &flat, Some(tok.path())).unwrap();
    let loaded = load_weights(&dir, &cfg, &layout, 99).unwrap();
    assert_eq!(bits(&loaded.flat), bits(&flat));
    assert!(loaded.notices.is_empty(), "{:?}", loaded.notices);

    let mut files: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "model.safetensors",
            "tokenizer_config.json",
            "vocab.txt"
        ],
        "no temp files left"
    );
    for f in ["vocab.txt", "tokenizer_config.json"] {
        assert_eq!(
            fs::read(dir.join(f)).unwrap(),
            fs::read(tok.path().join(f)).unwrap()
        );
    }
    let saved_cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(saved_cfg.id2label, cfg.id2label);
    assert_eq!(ParamLayout::new(&saved_cfg), layout);
}

#[test]
fn saved_file_has_full_names_f32_and_pt_metadata() {
    let (cfg, layout) = tiny();
    let flat = random_flat(&layout, 2);
    let out = TempDir::new("weights-format");
    save_pretrained(out.path(), &cfg, &layout, &flat, None).unwrap();
    let bytes = fs::read(out.path().join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort();
    let mut expected: Vec<&str> = layout.specs.iter().map(|s| s.name.as_str()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for spec in &layout.specs {
        let t = file.tensor(&spec.name).unwrap();
        assert_eq!(
            (t.dtype(), t.shape()),
            (Dtype::F32, spec.shape.as_slice()),
            "{}",
            spec.name
        );
    }
    assert!(
        !out.path().join("vocab.txt").exists(),
        "no tokenizer given, none copied"
    );
    #[cfg(unix)]
    {
        // The weights are as readable as any other file the user creates, not owner-only.
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| {
            fs::metadata(out.path().join(f))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(mode("model.safetensors"), mode("config.json"));
    }
}

#[test]
fn saving_again_replaces_the_previous_files() {
    let (cfg, layout) = tiny();
    let out = TempDir::new("weights-resave");
    save_pretrained(out.path(), &cfg, &layout, &random_flat(&layout, 3), None).unwrap();
    let second = random_flat(&layout, 4);
    save_pretrained(out.path(), &cfg, &layout, &second, None).unwrap();
    assert_eq!(
        bits(&load_weights(out.path(), &cfg, &layout, 0).unwrap().flat),
        bits(&second)
    );
}

#[test]
fn save_refuses_bad_input_before_writing() {
    let (cfg, layout) = tiny();
    let out = TempDir::new("weights-save-bad");
    let dir = out.path().join("never");
    let err = save_pretrained(&dir, &cfg, &layout, &[0.0; 5], None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "cannot save 5 values: the model has {} parameters",
            layout.total
        )
    );
    let empty = TempDir::new("weights-save-bad-tok");
    let err = format!(
        "{:#}",
        save_pretrained(
            &dir,
            &cfg,
            &layout,
            &random_flat(&layout, 0),
            Some(empty.path())
        )
        .unwrap_err()
    );
    assert!(
        err.contains(&empty.path().display().to_string()) && err.contains("no tokenizer files"),
        "{err}"
    );
    assert!(!dir.exists(), "nothing written");
}

#[test]
fn bert_model_names_and_tf_layernorm_names_load() {
    let (cfg, layout) = tiny();
    let flat = random_flat(&layout, 5);
    let dir = TempDir::new("weights-names");
    let rename = |n: &str| {
        let n = n.strip_prefix("bert.").unwrap_or(n);
        Some(
            n.replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta"),
        )
    };
    write_file(
        &dir.path().join("model.safetensors"),
        &tensors_of(&layout, &flat, Dtype::F32, rename),
    );
    let loaded = load_weights(dir.path(), &cfg, &layout, 0).unwrap();
    assert_eq!(bits(&loaded.flat), bits(&flat));
    assert!(loaded.notices.is_empty(), "{:?}", loaded.notices);
}

#[test]
fn f16_and_bf16_storage_is_converted() {
    let (cfg, layout) = tiny();
    for (dtype, round) in [
        (
            Dtype::F16,
            (|v| f16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::BF16, |v| bf16::from_f32(v).to_f32()),
    ] {
        let flat = random_flat(&layout, 6);
        let dir = TempDir::new(&format!("{dtype}"));
        write_file(
            &dir.path().join("model.safetensors"),
            &tensors_of(&layout, &flat, dtype, keep),
        );
        let loaded = load_weights(dir.path(), &cfg, &layout, 0).unwrap();
        let expected: Vec<f32> = flat.iter().map(|&v| round(v)).collect();
        assert_eq!(bits(&loaded.flat), bits(&expected), "{dtype}");
        assert_ne!(
            bits(&loaded.flat),
            bits(&flat),
            "{dtype}: the rounding is visible, so the test can fail"
        );
    }
}

#[test]
fn sharded_checkpoint_loads() {
    let (cfg, layout) = tiny();
    let flat = random_flat(&layout, 7);
    let dir = TempDir::new("weights-sharded");
    let all = tensors_of(&layout, &flat, Dtype::F32, keep);
    let (a, b) = all.split_at(all.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        write_file(&dir.path().join(file), part);
        for t in part {
            weight_map.insert(t.name.clone(), file.into());
        }
    }
    let index =
        serde_json::json!({"metadata": {"total_size": flat.len() * 4}, "weight_map": weight_map});
    fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = load_weights(dir.path(), &cfg, &layout, 0).unwrap();
    assert_eq!(bits(&loaded.flat), bits(&flat));

    // A shard the index names but the folder lacks is an error naming the shard.
    fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path(), &cfg, &layout);
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn ignored_and_unused_tensors_are_reported() {
    let (cfg, layout) = tiny();
    let flat = random_flat(&layout, 8);
    let dir = TempDir::new("weights-extra");
    let mut tensors = tensors_of(&layout, &flat, Dtype::F32, keep);
    let extra = |name: &str, dtype: Dtype| Raw {
        name: name.into(),
        dtype,
        shape: vec![2],
        bytes: encode(&[0.0, 1.0], dtype),
    };
    tensors.extend([
        // position_ids is an integer buffer: its dtype must not be an error.
        Raw {
            name: "bert.embeddings.position_ids".into(),
            dtype: Dtype::I32,
            shape: vec![1, 2],
            bytes: encode(&[0.0, 1.0], Dtype::I32),
        },
        extra("cls.predictions.bias", Dtype::F32),
        extra("cls.seq_relationship.bias", Dtype::F32),
        extra("qa_outputs.bias", Dtype::F32),
        extra("bert.encoder.layer.9.output.dense.bias", Dtype::F16),
    ]);
    write_file(&dir.path().join("model.safetensors"), &tensors);
    let loaded = load_weights(dir.path(), &cfg, &layout, 0).unwrap();
    assert_eq!(bits(&loaded.flat), bits(&flat));
    assert_eq!(
        loaded.notices,
        [
            "ignored 1 position-id buffer (*.position_ids)",
            "ignored 2 pre-training head tensors (cls.*)",
            "weights not used by BertForSequenceClassification: bert.encoder.layer.9.output.dense.bias, qa_outputs.bias",
        ]
    );
}

#[test]
fn missing_head_is_initialized_like_transformers() {
    // Wide enough that the sample std of the pooler weight is a tight estimate.
    let cfg = BertConfig::from_json(
        r#"{"vocab_size":10,"hidden_size":64,"num_attention_heads":4,"num_hidden_layers":1,
            "intermediate_size":8,"max_position_embeddings":8,"num_labels":2,"initializer_range":0.05}"#,
    )
    .unwrap();
    let layout = ParamLayout::new(&cfg);
    let flat = random_flat(&layout, 9);
    let dir = TempDir::new("weights-head");
    let body = |n: &str| {
        (!n.starts_with("bert.pooler") && !n.starts_with("classifier")).then(|| n.to_string())
    };
    write_file(
        &dir.path().join("model.safetensors"),
        &tensors_of(&layout, &flat, Dtype::F32, body),
    );

    let loaded = load_weights(dir.path(), &cfg, &layout, 42).unwrap();
    assert_eq!(
        loaded.notices,
        ["newly initialized: bert.pooler.dense.weight, bert.pooler.dense.bias, classifier.weight, \
          classifier.bias (train this model before using it)"]
    );
    let pooler = slice(&layout, &loaded.flat, "bert.pooler.dense.weight");
    let n = pooler.len() as f64;
    let mean = pooler.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (pooler
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(mean.abs() < 0.005, "mean {mean}");
    assert!(
        (std - 0.05).abs() < 0.05 * 0.05,
        "std {std}, initializer_range 0.05"
    );
    assert!(slice(&layout, &loaded.flat, "bert.pooler.dense.bias")
        .iter()
        .all(|&x| x == 0.0));
    assert!(slice(&layout, &loaded.flat, "classifier.bias")
        .iter()
        .all(|&x| x == 0.0));
    let classifier = slice(&layout, &loaded.flat, "classifier.weight");
    assert!(classifier.iter().all(|&x| x != 0.0));
    assert_ne!(
        &classifier[..8],
        &pooler[..8],
        "each tensor draws its own stream"
    );
    let body_len = layout.get("bert.pooler.dense.weight").unwrap().offset;
    assert_eq!(
        bits(&loaded.flat[..body_len]),
        bits(&flat[..body_len]),
        "the body is the file's"
    );

    let fresh = random_init(&cfg, &layout, 42);
    assert_eq!(
        bits(&loaded.flat[body_len..]),
        bits(&fresh[body_len..]),
        "the head is what a whole random init under the same seed draws"
    );

    let again = load_weights(dir.path(), &cfg, &layout, 42).unwrap();
    assert_eq!(
        bits(&again.flat),
        bits(&loaded.flat),
        "same seed, same weights"
    );
    let other = load_weights(dir.path(), &cfg, &layout, 43).unwrap();
    assert_ne!(
        slice(&layout, &other.flat, "classifier.weight"),
        classifier,
        "another seed, other weights"
    );
}

#[test]
fn missing_body_tensor_is_an_error() {
    let (cfg, layout) = tiny();
    let dir = TempDir::new("weights-missing");
    let gone = "bert.encoder.layer.1.intermediate.dense.weight";
    let drop_one = |n: &str| (n != gone).then(|| n.to_string());
    write_file(
        &dir.path().join("model.safetensors"),
        &tensors_of(&layout, &random_flat(&layout, 0), Dtype::F32, drop_one),
    );
    let file = dir.path().join("model.safetensors");
    assert_eq!(
        load_err(dir.path(), &cfg, &layout),
        format!("{}: tensor {gone} is missing", file.display())
    );
}

#[test]
fn wrong_shape_is_an_error_with_both_shapes() {
    let (cfg, layout) = tiny();
    let two_labels = BertConfig::from_json(&TINY.replace(
        r#""id2label":{"0":"neg","1":"neutral","2":"pos"}"#,
        r#""num_labels":2"#,
    ))
    .unwrap();
    let two_layout = ParamLayout::new(&two_labels);
    let dir = TempDir::new("weights-shape");
    write_file(
        &dir.path().join("model.safetensors"),
        &tensors_of(&two_layout, &random_flat(&two_layout, 0), Dtype::F32, keep),
    );
    let file = dir.path().join("model.safetensors");
    assert_eq!(
        load_err(dir.path(), &cfg, &layout),
        format!(
            "{}: tensor classifier.weight has shape [2, 12], the config expects [3, 12]",
            file.display()
        )
    );
}

#[test]
fn unsupported_dtype_is_an_error() {
    let (cfg, layout) = tiny();
    let dir = TempDir::new("weights-dtype");
    let mut tensors = tensors_of(&layout, &random_flat(&layout, 0), Dtype::F32, keep);
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "bert.embeddings.LayerNorm.bias")
        .unwrap();
    t.dtype = Dtype::I32;
    write_file(&dir.path().join("model.safetensors"), &tensors);
    let file = dir.path().join("model.safetensors");
    assert_eq!(
        load_err(dir.path(), &cfg, &layout),
        format!(
            "{}: tensor bert.embeddings.LayerNorm.bias has dtype I32, only F32, F16 and BF16 are supported",
            file.display()
        )
    );
}

#[test]
fn the_same_tensor_twice_is_an_error() {
    let (cfg, layout) = tiny();
    let dir = TempDir::new("weights-twice");
    let mut tensors = tensors_of(&layout, &random_flat(&layout, 0), Dtype::F32, keep);
    let copy = tensors_of(&layout, &random_flat(&layout, 0), Dtype::F32, |n| {
        (n == "bert.pooler.dense.bias").then(|| "pooler.dense.bias".to_string())
    });
    tensors.extend(copy);
    write_file(&dir.path().join("model.safetensors"), &tensors);
    let err = load_err(dir.path(), &cfg, &layout);
    assert!(err.ends_with("tensor bert.pooler.dense.bias appears twice, as bert.pooler.dense.bias and as pooler.dense.bias"), "{err}");
}

#[test]
fn missing_or_unreadable_files_are_errors() {
    let (cfg, layout) = tiny();
    let dir = TempDir::new("weights-nofile");
    let err = load_err(dir.path(), &cfg, &layout);
    assert_eq!(
        err,
        format!(
            "{}: no model.safetensors or model.safetensors.index.json in this folder",
            dir.path().display()
        )
    );

    fs::write(dir.path().join("pytorch_model.bin"), b"not read").unwrap();
    let err = load_err(dir.path(), &cfg, &layout);
    assert!(
        err.contains("pytorch_model.bin: only safetensors checkpoints are supported"),
        "{err}"
    );

    fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{garbage",
    )
    .unwrap();
    let err = load_err(dir.path(), &cfg, &layout);
    assert!(
        err.starts_with(&format!(
            "{}: not a valid safetensors file",
            dir.path().join("model.safetensors").display()
        )),
        "{err}"
    );

    fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": [1,",
    )
    .unwrap();
    let err = load_err(dir.path(), &cfg, &layout);
    assert!(
        err.contains("model.safetensors.index.json: invalid JSON") && err.contains("line 1 column"),
        "{err}"
    );
}

#[test]
fn layout_of_another_config_is_refused() {
    let (cfg, _) = tiny();
    let other = ParamLayout::new(
        &BertConfig::from_json(&TINY.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":1"))
            .unwrap(),
    );
    let dir = TempDir::new("weights-layout");
    let err = load_err(dir.path(), &cfg, &other);
    assert!(err.contains("not built from this config"), "{err}");
    assert!(save_pretrained(dir.path(), &cfg, &other, &vec![0.0; other.total], None).is_err());
}

#[test]
fn minilm_loads_and_matches_its_file() {
    let dir = common::minilm_dir();
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let layout = ParamLayout::new(&cfg);
    let loaded = load_weights(&dir, &cfg, &layout, 0).unwrap();
    assert_eq!(
        loaded.notices,
        [
            "ignored 1 position-id buffer (*.position_ids)",
            "newly initialized: classifier.weight, classifier.bias (train this model before using it)",
        ]
    );

    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut compared = 0;
    for (name, view) in file.tensors() {
        if name.ends_with("position_ids") {
            continue;
        }
        let spec = layout
            .get(&format!("bert.{name}"))
            .unwrap_or_else(|| panic!("{name} is a layout tensor"));
        let expected: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(
            bits(&loaded.flat[spec.offset..spec.offset + spec.len()]),
            bits(&expected),
            "{name}"
        );
        compared += spec.len();
    }
    let head = layout.get("classifier.weight").unwrap();
    assert_eq!(
        compared, head.offset,
        "every tensor before the classifier came from the file"
    );

    // What a fine-tuning run writes at the end must reload unchanged, tokenizer included.
    let out = TempDir::new("weights-minilm-save");
    save_pretrained(out.path(), &cfg, &layout, &loaded.flat, Some(&dir)).unwrap();
    let again = load_weights(out.path(), &cfg, &layout, 7).unwrap();
    assert!(again.notices.is_empty(), "{:?}", again.notices);
    assert_eq!(bits(&again.flat), bits(&loaded.flat));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        assert_eq!(
            fs::read(out.path().join(f)).unwrap(),
            fs::read(dir.join(f)).unwrap(),
            "{f}"
        );
    }
}
