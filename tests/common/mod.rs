//! Shared by the integration tests: where the test assets are.
#![allow(dead_code)]

pub mod cli;
pub mod fixture;
pub mod naive;
pub mod tfevents;
pub mod tiny;

use std::path::{Path, PathBuf};

/// The repository's committed fixtures (`tests/fixtures/`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The all-MiniLM-L6-v2 Hugging Face folder. `tests/run.sh` fetches it and sets
/// `BERTFT_MINILM_DIR`; a test that needs it fails (never skips) when it is missing.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("BERTFT_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-assets/all-minilm-l6-v2")
        });
    assert!(
        dir.join("model.safetensors").is_file(),
        "the all-MiniLM-L6-v2 checkpoint is not at {} (run tests/run.sh, which fetches it, or set BERTFT_MINILM_DIR)",
        dir.display()
    );
    dir
}

/// SST-2 (GLUE), read where the workplace keeps it; `BERTFT_SST2_DIR` overrides.
pub fn sst2_dir() -> PathBuf {
    let dir = std::env::var_os("BERTFT_SST2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sst2"));
    assert!(
        dir.join("dev.tsv").is_file(),
        "SST-2 is not at {} (set BERTFT_SST2_DIR)",
        dir.display()
    );
    dir
}

/// A folder under the system temp dir, unique to this process and tag, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("bertft-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
