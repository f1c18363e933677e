//! `--model org/name` through a local stand-in for the Hugging Face hub (`HF_ENDPOINT`): the
//! files land in the cache and the model runs; a missing repository is a one-line error; with
//! `HF_HUB_OFFLINE=1` only the cache is used.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::cli::*;

/// Serves `files` (URL path → bytes) over HTTP/1.1 with keep-alive; 404 for anything else.
/// Returns the endpoint and the log of requested paths.
fn fake_hub(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = stream;
            loop {
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap_or(0) == 0 {
                    break;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(path.clone());
                let (status, body) = match files.get(&path) {
                    Some(b) => ("200 OK", b.clone()),
                    None => ("404 Not Found", b"not found".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if out
                    .write_all(head.as_bytes())
                    .and_then(|_| out.write_all(&body))
                    .is_err()
                {
                    break;
                }
            }
            let _ = reader.read_to_end(&mut Vec::new());
        }
    });
    (endpoint, log)
}

fn repo_files(model: &Path, repo: &str) -> HashMap<String, Vec<u8>> {
    [
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|f| {
        (
            format!("/{repo}/resolve/main/{f}"),
            std::fs::read(model.join(f)).unwrap(),
        )
    })
    .collect()
}

#[test]
fn a_hub_model_is_fetched_into_the_cache_and_runs() {
    let root = scratch("hub");
    let model = tiny_model_dir(&root);
    let (endpoint, log) = fake_hub(repo_files(&model, "org/tiny"));
    let cache = root.join("cache");
    let inspect = |extra_env: &[(&str, &str)]| {
        let mut c = bin();
        c.args(["inspect", "--model", "org/tiny", "--text", "w5 w6"])
            .env("HF_ENDPOINT", &endpoint)
            .env("BERTFT_CACHE", &cache);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c
    };
    let out = run_ok(&mut inspect(&[]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 labels"));
    assert_eq!(
        std::fs::read(cache.join("org--tiny/model.safetensors")).unwrap(),
        std::fs::read(model.join("model.safetensors")).unwrap()
    );
    let requested = log.lock().unwrap().clone();
    assert!(
        requested.contains(&"/org/tiny/resolve/main/config.json".to_string()),
        "{requested:?}"
    );
    // Cached: offline works, and nothing more is requested.
    let before = log.lock().unwrap().len();
    run_ok(&mut inspect(&[("HF_HUB_OFFLINE", "1")]));
    assert_eq!(log.lock().unwrap().len(), before);
    // No partial files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(cache.join("org--tiny"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".part-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_missing_repository_is_a_one_line_error() {
    let root = scratch("hub-missing");
    let (endpoint, _) = fake_hub(HashMap::new());
    let e = run_err(
        bin()
            .args(["inspect", "--model", "org/nothing"])
            .env("HF_ENDPOINT", &endpoint)
            .env("BERTFT_CACHE", root.join("cache")),
    );
    assert!(e.contains("org/nothing") && e.contains("404"), "{e}");
    let e = run_err(
        bin()
            .args(["inspect", "--model", "org/nothing"])
            .env("HF_HUB_OFFLINE", "1")
            .env("BERTFT_CACHE", root.join("cache")),
    );
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
}
