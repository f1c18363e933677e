//! The GPU session script (benches/device/session.sh) names cuda_ops tests by `--exact` name;
//! one that does not exist runs nothing and passes, so a renamed test would silently drop out of
//! the sanitizer runs of the only sessions that have a GPU. Checked here, without one.

use std::path::Path;

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The test function names of a test file (`#[test]` then `fn name(`).
fn test_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut after_attribute = false;
    for line in source.lines().map(str::trim) {
        if line == "#[test]" {
            after_attribute = true;
        } else if after_attribute {
            if let Some(rest) = line.strip_prefix("fn ") {
                names.push(rest.split('(').next().unwrap().to_string());
                after_attribute = false;
            }
        }
    }
    names
}

/// The words of the `${SANITIZE:-…}` defaults in session.sh.
fn sanitized_names(script: &str) -> Vec<String> {
    let mut names = Vec::new();
    for chunk in script.split("${SANITIZE:-").skip(1) {
        let list = chunk.split('}').next().unwrap();
        names.extend(
            list.split_whitespace()
                .filter(|w| *w != "\\")
                .map(str::to_string),
        );
    }
    names
}

#[test]
fn the_session_script_sanitizes_tests_that_exist() {
    let tests = test_names(&read("tests/cuda_ops.rs"));
    assert!(tests.len() >= 20, "found only {tests:?}");
    let script = read("benches/device/session.sh");
    let mut named = sanitized_names(&script);
    // The doctor test the tests stage runs alone.
    let doctor = test_names(&read("tests/doctor.rs"));
    let t = "doctor_without_arch_uses_the_gpu_or_asks_for_arch";
    assert!(script.contains(t) && doctor.iter().any(|d| d == t), "{t}");
    assert!(named.len() >= 10, "found only {named:?}");
    named.sort();
    named.dedup();
    let missing: Vec<&String> = named.iter().filter(|n| !tests.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "session.sh sanitizes tests that do not exist: {missing:?}"
    );
}
