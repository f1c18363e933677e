//! `bertft-cuda doctor` and the kernel compiler behind it: every kernel file of `kernels/`
//! compiles to CUBIN with NVRTC, compile errors name the file and carry NVRTC's log, and a
//! second compile of the same inputs comes from the cache.
//!
//! NVRTC comes from `BERTFT_CUDA_WHEELS` (set by tests/run.sh, which fetches the NVRTC wheels)
//! or a CUDA 13 toolkit; without one these tests fail, saying so. No GPU is needed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bertft_cuda::backend::cuda::{
    driver, kernel_files, kernel_headers, nvrtc, Arch, CompileError, KernelCache, KernelCompiler,
    Nvrtc,
};
use common::cli::{bin, run, scratch};

fn require_nvrtc() -> &'static Nvrtc {
    nvrtc().unwrap_or_else(|e| {
        panic!(
            "these tests need NVRTC 13: run tests/run.sh, which fetches the NVRTC wheels and sets \
             BERTFT_CUDA_WHEELS (or set CUDA_HOME to a CUDA 13 toolkit). {e:#}"
        )
    })
}

fn arch(s: &str) -> Arch {
    s.parse().unwrap()
}

/// The `.cu` files in kernels/, read from the folder now (not from what the binary embeds).
fn kernel_files_on_disk() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    files.sort();
    files
}

/// Runs `doctor` (with a fresh kernel cache) and returns (exit success, stdout, stderr).
fn doctor(cache: &Path, args: &[&str]) -> (bool, String, String) {
    require_nvrtc();
    let out = run(bin().arg("doctor").args(args).env("BERTFT_CACHE", cache));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks doctor's output has exactly one `ok` line per kernel file, for `arch`.
fn assert_one_ok_line_per_file(stdout: &str, arch: &str) {
    let files = kernel_files_on_disk();
    assert!(
        !files.is_empty(),
        "kernels/ has no .cu file: nothing was checked"
    );
    let ok_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ok  ")).collect();
    assert_eq!(ok_lines.len(), files.len(), "{stdout}");
    for f in &files {
        let prefix = format!("ok  {f}  ({arch}, ");
        let n = ok_lines.iter().filter(|l| l.starts_with(&prefix)).count();
        assert_eq!(n, 1, "no single ok line for {f}:\n{stdout}");
    }
    assert!(
        stdout.contains(&format!(
            "compiling {} kernel files for {arch}:",
            files.len()
        )),
        "{stdout}"
    );
}

fn doctor_compiles_every_kernel_for(arch: &str) {
    let root = scratch(&format!("doctor-{arch}"));
    let (ok, stdout, stderr) = doctor(&root, &["--arch", arch]);
    assert!(ok, "doctor --arch {arch} failed:\n{stdout}\n{stderr}");
    assert_one_ok_line_per_file(&stdout, arch);
    assert!(
        stdout.lines().any(|l| l.starts_with("NVRTC: 13.")),
        "{stdout}"
    );
    let cache_line = format!("kernel cache: {}", root.join("kernels").display());
    assert!(stdout.contains(&cache_line), "{stdout}");
    // Every kernel file left one entry in the cache; a second run reads them all.
    let entries = std::fs::read_dir(root.join("kernels")).unwrap().count();
    assert_eq!(entries, kernel_files_on_disk().len());
    let (ok, stdout, _) = doctor(&root, &["--arch", arch, "--resources"]);
    assert!(ok);
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(", cached)")).count(),
        kernel_files_on_disk().len(),
        "{stdout}"
    );
    assert_resources(&stdout, arch);
}

/// `--resources` lists every kernel of every file under its `ok` line, with the registers ptxas
/// gave it (1..=255) and its stack frame: 0 bytes, no spills, for every kernel outside
/// attention.cu, whose header documents its few bytes of spills (fp32 CUDA-core attention; the
/// tensor-core kernels, attention_tc.cu, must not spill).
fn assert_resources(stdout: &str, arch: &str) {
    let mut file = "";
    let mut kernels = 0;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("ok  ") {
            let (name, counted) = rest.split_once("  (").unwrap();
            let n: usize = counted
                .split(", ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            file = name;
            kernels += n;
            continue;
        }
        let Some(res) = line.strip_prefix("      ") else {
            continue;
        };
        let words: Vec<&str> = res.split_whitespace().collect();
        let (regs, frame, kernel) = (words[0], words[2], words[6]);
        assert!(
            (1..=255).contains(&regs.parse::<u32>().unwrap()),
            "{arch} {file} {kernel}: {regs} registers"
        );
        let frame: u32 = frame.parse().unwrap();
        assert!(
            frame == 0 || file == "attention.cu",
            "{arch} {file} {kernel}: a {frame}-byte stack frame (spills)"
        );
        kernels -= 1;
    }
    assert_eq!(kernels, 0, "a kernel without its resources line:\n{stdout}");
}

#[test]
fn doctor_compiles_every_kernel_for_sm_90() {
    doctor_compiles_every_kernel_for("sm_90");
}

#[test]
fn doctor_compiles_every_kernel_for_sm_80() {
    doctor_compiles_every_kernel_for("sm_80");
}

#[test]
fn doctor_without_arch_uses_the_gpu_or_asks_for_arch() {
    let root = scratch("doctor-noarch");
    let (ok, stdout, stderr) = doctor(&root, &[]);
    match driver().and_then(|d| d.gpus()) {
        Ok(gpus) if !gpus.is_empty() => {
            assert!(ok, "{stdout}\n{stderr}");
            assert_one_ok_line_per_file(&stdout, &gpus[0].arch().to_string());
        }
        _ => {
            assert!(!ok, "{stdout}");
            assert!(
                stdout.contains("GPU: no CUDA driver/GPU found: "),
                "{stdout}"
            );
            let last = stderr.lines().last().unwrap_or_default();
            assert!(
                last.starts_with("error: ") && last.contains("--arch"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn doctor_rejects_a_bad_or_unsupported_arch() {
    let root = scratch("doctor-badarch");
    for (a, expect) in [
        ("sm9", "invalid GPU architecture"),
        ("sm_50", "does not compile for sm_50"),
    ] {
        let (ok, _, stderr) = doctor(&root, &["--arch", a]);
        assert!(!ok);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(expect),
            "{stderr}"
        );
    }
}

fn compiler(dir: &Path) -> KernelCompiler<'static> {
    KernelCompiler::new(require_nvrtc(), KernelCache::new(dir))
}

fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[test]
fn syntax_error_names_the_file_and_carries_nvrtc_log() {
    let root = scratch("kernel-syntax-error");
    let c = compiler(&root);
    let src = "extern \"C\" __global__ void broken(float* x) {\n    x[0] = no_such_name;\n}\n";
    let e = c
        .compile("broken.cu", src, &kernel_headers(), arch("sm_90"))
        .unwrap_err();
    let ce = e
        .downcast_ref::<CompileError>()
        .unwrap_or_else(|| panic!("not a CompileError: {e:#}"));
    assert_eq!(ce.file, "broken.cu");
    assert_eq!(ce.arch, arch("sm_90"));
    // NVRTC's own words: the file, the line and what is wrong.
    assert!(ce.log.contains("broken.cu(2): error"), "{}", ce.log);
    assert!(ce.log.contains("no_such_name"), "{}", ce.log);
    let msg = format!("{e:#}");
    assert!(
        msg.starts_with("broken.cu does not compile for sm_90:"),
        "{msg}"
    );
    assert!(msg.contains("broken.cu(2)"), "{msg}");
    assert_eq!(c.nvrtc_calls(), 1);
    assert!(
        cache_entries(&root).is_empty(),
        "a failed compile was cached"
    );
}

#[test]
fn a_missing_header_is_a_compile_error() {
    let root = scratch("kernel-missing-header");
    let src = "#include \"nowhere.cuh\"\nextern \"C\" __global__ void k() {}\n";
    let e = compiler(&root)
        .compile("inc.cu", src, &kernel_headers(), arch("sm_90"))
        .unwrap_err();
    let ce = e.downcast_ref::<CompileError>().unwrap();
    assert!(ce.log.contains("nowhere.cuh"), "{}", ce.log);
}

/// A kernel that includes the in-memory header common.cuh and the toolkit's fp16 header.
const PHILOX_SRC: &str = r#"#include <cuda_fp16.h>
#include "common.cuh"
extern "C" __global__ void dropout_mask(__half* y, unsigned long long seed, unsigned long long n) {
    unsigned long long b = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (4 * b >= n) return;
    float u[4];
    philox_uniform4(seed, 7, b, u);
    for (int j = 0; j < 4 && 4 * b + j < n; ++j) y[4 * b + j] = __float2half_rn(u[j]);
}
extern "C" __global__ void zero(float* x) { x[threadIdx.x] = 0.0f; }
"#;

#[test]
fn second_compile_reads_the_cache() {
    let root = scratch("kernel-cache");
    let headers = kernel_headers();
    let first = compiler(&root);
    let a = first
        .compile("philox.cu", PHILOX_SRC, &headers, arch("sm_90"))
        .unwrap();
    assert!(!a.cached);
    assert_eq!(first.nvrtc_calls(), 1);
    let mut names = a.kernels.clone();
    names.sort();
    assert_eq!(names, ["dropout_mask", "zero"]);
    assert_eq!(cache_entries(&root), std::slice::from_ref(&a.cache_path));

    // A new compiler (as in a new process) over the same folder calls NVRTC not at all.
    let second = compiler(&root);
    let b = second
        .compile("philox.cu", PHILOX_SRC, &headers, arch("sm_90"))
        .unwrap();
    assert!(b.cached);
    assert_eq!(second.nvrtc_calls(), 0);
    assert_eq!(b.cubin, a.cubin);
    assert_eq!(b.kernels, a.kernels);

    // Another architecture, or another header text, compiles afresh.
    second
        .compile("philox.cu", PHILOX_SRC, &headers, arch("sm_80"))
        .unwrap();
    assert_eq!(second.nvrtc_calls(), 1);
    let edited: Vec<(&str, String)> = headers
        .iter()
        .map(|(n, t)| (*n, format!("{t}\n// edited\n")))
        .collect();
    let edited: Vec<(&str, &str)> = edited.iter().map(|(n, t)| (*n, t.as_str())).collect();
    second
        .compile("philox.cu", PHILOX_SRC, &edited, arch("sm_90"))
        .unwrap();
    assert_eq!(second.nvrtc_calls(), 2);
    assert_eq!(cache_entries(&root).len(), 3);
}

#[test]
fn a_corrupt_cache_entry_is_recompiled() {
    let root = scratch("kernel-cache-corrupt");
    let first = compiler(&root);
    let a = first
        .compile("philox.cu", PHILOX_SRC, &kernel_headers(), arch("sm_90"))
        .unwrap();
    std::fs::write(&a.cache_path, &a.cubin[..100]).unwrap();
    let second = compiler(&root);
    let b = second
        .compile("philox.cu", PHILOX_SRC, &kernel_headers(), arch("sm_90"))
        .unwrap();
    assert!(!b.cached);
    assert_eq!(second.nvrtc_calls(), 1);
    assert_eq!(std::fs::read(&a.cache_path).unwrap(), a.cubin);
}

#[test]
fn fast_math_is_a_per_file_directive() {
    let root = scratch("kernel-fast-math");
    let c = compiler(&root);
    let body = "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] = expf(x[threadIdx.x]) / x[threadIdx.x + 32]; }\n";
    let plain = c
        .compile("fm.cu", &format!("// plain\n{body}"), &[], arch("sm_90"))
        .unwrap();
    let fast = c
        .compile(
            "fm.cu",
            &format!("// nvrtc-options: --use_fast_math\n{body}"),
            &[],
            arch("sm_90"),
        )
        .unwrap();
    // Approximate exp and division make other machine code.
    assert_ne!(plain.cubin, fast.cubin);
}

#[test]
fn cast_kernels_compile_with_their_names() {
    let root = scratch("kernel-cast");
    let k = compiler(&root)
        .compile_kernel_file("cast.cu", arch("sm_90"))
        .unwrap();
    let mut names = k.kernels.clone();
    names.sort();
    assert_eq!(names, ["cast_f32_to_bf16", "cast_f32_to_f16"]);
}

#[test]
fn every_embedded_kernel_file_is_on_disk() {
    // The binary embeds kernels/ at build time; the doctor tests count the folder at test time.
    let embedded: Vec<String> = kernel_files().iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(embedded, kernel_files_on_disk());
    let headers: BTreeMap<_, _> = kernel_headers().into_iter().collect();
    assert!(headers.contains_key("common.cuh"));
}
