//! Models from the Hugging Face hub: `--model org/name` downloads the files a model folder
//! needs into a local cache, then everything reads that folder.
//!
//! As huggingface_hub does it: files from `{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`
//! (endpoint default `https://huggingface.co`), a token from `HF_TOKEN`, `HF_HUB_OFFLINE=1` to
//! use the cache only. The cache is `$BERTFT_CACHE` or `~/.cache/bertft-cuda/hub/<org>--<name>/`.
//! Each file is written to a temporary name and renamed, so an interrupted download never
//! leaves a partial file that a later run would take as complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const REQUIRED: &[&str] = &["config.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
];

/// Whether `model` names a hub repository (`org/name` or `name`) rather than a local path.
pub fn looks_like_repo_id(model: &str) -> bool {
    let parts: Vec<&str> = model.split('/').collect();
    !model.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTFT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/bertft-cuda/hub")
}

pub fn cache_dir(repo_id: &str) -> PathBuf {
    cache_root().join(repo_id.replace('/', "--"))
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1" | "true" | "TRUE" | "True")
    )
}

/// The folder holding `repo_id`'s model files, downloading what the cache lacks.
pub fn fetch_model(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let dir = cache_dir(repo_id);
    let complete = dir.join("config.json").is_file()
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file());
    if complete {
        return Ok(dir);
    }
    if offline() {
        bail!(
            "{repo_id}: not in the cache at {} and HF_HUB_OFFLINE is set",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let hub = Hub {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        repo_id,
        revision,
    };
    for f in REQUIRED {
        hub.download(f, &dir, true)?;
    }
    if !hub.download("model.safetensors", &dir, false)? {
        // A sharded checkpoint: the index names the shards.
        if !hub.download("model.safetensors.index.json", &dir, false)? {
            bail!("{repo_id}: the repository has no model.safetensors (only safetensors weights are supported)");
        }
        for shard in shard_names(&dir.join("model.safetensors.index.json"))? {
            hub.download(&shard, &dir, true)?;
        }
    }
    for f in OPTIONAL {
        hub.download(f, &dir, false)?;
    }
    Ok(dir)
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    let map = v["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

struct Hub<'a> {
    endpoint: String,
    repo_id: &'a str,
    revision: &'a str,
}

impl Hub<'_> {
    /// Downloads `file` into `dir`; `Ok(false)` when the repository has no such file and it is
    /// not `required`.
    fn download(&self, file: &str, dir: &Path, required: bool) -> Result<bool> {
        let dest = dir.join(file);
        if dest.is_file() {
            return Ok(true);
        }
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint, self.repo_id, self.revision, file
        );
        let mut request = ureq::get(&url);
        if let Ok(token) = std::env::var("HF_TOKEN") {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::StatusCode(404)) if !required => return Ok(false),
            Err(ureq::Error::StatusCode(code)) => bail!("{url}: HTTP {code}"),
            Err(e) => bail!("{url}: {e}"),
        };
        let tmp = dir.join(format!(".{file}.part-{}", std::process::id()));
        let mut out = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut body = response.into_body().into_reader();
        std::io::copy(&mut body, &mut out).with_context(|| format!("{url}: download broke off"))?;
        out.sync_all().ok();
        std::fs::rename(&tmp, &dest).with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(looks_like_repo_id("bert-base-uncased"));
        for path in ["./model", "/abs/model", "a/b/c", "../x", "", "a b/c"] {
            assert!(!looks_like_repo_id(path), "{path}");
        }
    }
}
