//! Running the binary on a tiny model and small data files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::fixtures_dir;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bertft-cuda"))
}

/// A fresh folder under target/ for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny fixture BERT (vocab 97, 3 labels a/b/c) with a WordPiece vocabulary:
/// [PAD] [UNK] [CLS] [SEP] [MASK], then the words w5 … w96.
pub fn tiny_model_dir(root: &Path) -> PathBuf {
    let dir = root.join("tiny-model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures_dir().join("tiny_bert").join(f), dir.join(f)).unwrap();
    }
    let mut vocab = vec![
        "[PAD]".to_string(),
        "[UNK]".into(),
        "[CLS]".into(),
        "[SEP]".into(),
        "[MASK]".into(),
    ];
    vocab.extend((5..97).map(|i| format!("w{i}")));
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"do_lower_case": true}"#,
    )
    .unwrap();
    dir
}

/// A learnable 3-class task: the sentence's first word says the class (w5–w7 → a, w8–w10 → b,
/// w11–w13 → c), the 1–8 words after it are noise (w20–w96).
pub fn synthetic_rows(n: usize, seed: u64) -> Vec<(String, &'static str)> {
    let draw = |stream: u64, i: u64, k: f32| {
        (bertft_cuda::backend::philox::uniform(seed, stream, i) * k) as u64
    };
    (0..n as u64)
        .map(|r| {
            let first = 5 + draw(1, r, 9.0);
            let noise = (0..1 + draw(2, r, 8.0)).map(|k| 20 + draw(3, r * 16 + k, 77.0));
            let words: Vec<String> = std::iter::once(first)
                .chain(noise)
                .map(|w| format!("w{w}"))
                .collect();
            let label = match first {
                5..=7 => "a",
                8..=10 => "b",
                _ => "c",
            };
            (words.join(" "), label)
        })
        .collect()
}

pub fn write_tsv(path: &Path, rows: &[(String, &str)]) {
    let mut text = String::from("sentence\tlabel\n");
    for (s, l) in rows {
        text += &format!("{s}\t{l}\n");
    }
    std::fs::write(path, text).unwrap();
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "the binary panicked:\n{stderr}"
    );
    out
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail, returning its last stderr line (the error).
pub fn run_err(cmd: &mut Command) -> String {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected a failure, got success:\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or("").to_string();
    assert!(
        last.starts_with("error: "),
        "not a one-line error: {stderr}"
    );
    last
}
