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
    let mut vocab = vec!["[PAD]".to_string(), "[UNK]".into(), "[CLS]".into(), "[SEP]".into(), "[MASK]".into()];
    vocab.extend((5..97).map(|i| format!("w{i}")));
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"do_lower_case": true}"#).unwrap();
    dir
}

/// A learnable 3-class task: the label is the class of the sentence's first word
/// (w5–w34 → a, w35–w64 → b, w65–w94 → c), the rest is noise.
pub fn synthetic_rows(n: usize, seed: u64) -> Vec<(String, &'static str)> {
    let word = |i: u64| 5 + (bertft_cuda::backend::philox::uniform(seed, 1, i) * 90.0) as u64;
    (0..n as u64)
        .map(|r| {
            let first = word(r * 16);
            let len = 2 + (bertft_cuda::backend::philox::uniform(seed, 2, r) * 8.0) as u64;
            let words: Vec<String> = std::iter::once(first).chain((1..len).map(|k| word(r * 16 + k))).map(|w| format!("w{w}")).collect();
            let label = match first {
                5..=34 => "a",
                35..=64 => "b",
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
    assert!(!stderr.contains("panicked"), "the binary panicked:\n{stderr}");
    out
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs a command that must fail, returning its last stderr line (the error).
pub fn run_err(cmd: &mut Command) -> String {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure, got success:\n{stderr}");
    let last = stderr.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error: "), "not a one-line error: {stderr}");
    last
}
