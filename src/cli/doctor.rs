//! `bertft-cuda doctor`: what CUDA this machine offers, and whether every kernel compiles.
//!
//! Each piece is reported on its own line, found or not, and the report goes on past a missing
//! one (no driver is the normal case on a build machine); the kernels are then compiled for
//! `--arch` (default: GPU 0's), one line per kernel file (with `--resources`, then one line per
//! kernel: registers and stack frame). Exits 0 only if every file compiled.

use anyhow::{anyhow, bail, Result};
use clap::Args;

use crate::backend::cuda::cubin::kernel_resources;
use crate::backend::cuda::{
    cublas, driver, kernel_files, nvrtc, runtime, Arch, CompileError, KernelCache, KernelCompiler,
};

#[derive(Args)]
pub struct DoctorArgs {
    /// GPU architecture to compile the kernels for: sm_80, sm_90, sm_90a, … (default: GPU 0's).
    #[arg(long)]
    arch: Option<String>,
    /// Also list each kernel's registers per thread and stack frame (spills), as ptxas gave
    /// them (read from the compiled CUBIN: no GPU needed).
    #[arg(long)]
    resources: bool,
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    let arch: Option<Arch> = match &args.arch {
        Some(a) => Some(a.parse().map_err(|e| anyhow!("--arch: {e}"))?),
        None => None,
    };

    let mut gpu_arch = None;
    match driver() {
        Ok(d) => {
            println!(
                "CUDA driver: {}.{} ({})",
                d.version().0,
                d.version().1,
                d.path().display()
            );
            match d.gpus() {
                Ok(gpus) => {
                    for g in &gpus {
                        println!(
                            "GPU {}: {}, compute capability {}.{} ({}), {:.1} GiB, {} multiprocessors",
                            g.ordinal,
                            g.name,
                            g.compute_capability.0,
                            g.compute_capability.1,
                            g.arch(),
                            g.total_memory as f64 / (1u64 << 30) as f64,
                            g.multiprocessors
                        );
                    }
                    gpu_arch = gpus.first().map(|g| g.arch());
                }
                Err(e) => println!("GPU: cannot list the GPUs ({e:#})"),
            }
        }
        Err(e) => println!("GPU: {e:#}"),
    }
    match runtime() {
        Ok(r) => println!(
            "CUDA runtime: {}.{} ({})",
            r.version().0,
            r.version().1,
            r.path().display()
        ),
        Err(e) => println!("{e:#}"),
    }
    let nvrtc = nvrtc();
    match &nvrtc {
        Ok(n) => {
            println!(
                "NVRTC: {}.{} ({}; builtins {})",
                n.version().0,
                n.version().1,
                n.path().display(),
                n.builtins_path().display()
            );
            println!("CUDA headers: {}", n.include_dir().display());
        }
        Err(e) => println!("{e:#}"),
    }
    match cublas() {
        Ok(b) => println!(
            "cuBLAS: {}.{}.{} ({}; cuBLASLt {})",
            b.version().0,
            b.version().1,
            b.version().2,
            b.path().display(),
            b.lt_path().display()
        ),
        Err(e) => println!("{e:#}"),
    }
    let cache = KernelCache::open_default();
    match &cache {
        Ok(c) => println!("kernel cache: {}", c.dir().display()),
        Err(e) => println!("kernel cache: none ({e:#})"),
    }

    let nvrtc = nvrtc.map_err(|e| anyhow!("cannot compile the kernels: {e:#}"))?;
    let Some(arch) = arch.or(gpu_arch) else {
        bail!("no GPU to take the architecture from: give one with --arch, e.g. --arch sm_90");
    };
    if !nvrtc.supported_archs().contains(&arch.number) {
        let list: Vec<String> = nvrtc
            .supported_archs()
            .iter()
            .map(|a| format!("sm_{a}"))
            .collect();
        bail!(
            "NVRTC {}.{} does not compile for {arch} (it does: {})",
            nvrtc.version().0,
            nvrtc.version().1,
            list.join(", ")
        );
    }
    let compiler = KernelCompiler::new(nvrtc, cache?);
    let files = kernel_files();
    println!("compiling {} kernel files for {arch}:", files.len());
    let mut failed = 0;
    for (file, _) in &files {
        match compiler.compile_kernel_file(file, arch) {
            Ok(k) => {
                println!(
                    "ok  {file}  ({arch}, {} kernels, {:.1} s{})",
                    k.kernels.len(),
                    k.elapsed.as_secs_f64(),
                    if k.cached { ", cached" } else { "" }
                );
                if args.resources {
                    print_resources(&k.cubin);
                }
            }
            Err(e) => {
                failed += 1;
                match e.downcast_ref::<CompileError>() {
                    // NVRTC's log, indented under the file's line.
                    Some(c) => {
                        println!("FAIL  {file}  ({arch}): NVRTC's log:");
                        for line in c.log.lines().filter(|l| !l.trim().is_empty()) {
                            println!("      {line}");
                        }
                    }
                    None => println!("FAIL  {file}  ({arch}): {e:#}"),
                }
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} kernel files do not compile for {arch}",
            files.len()
        );
    }
    Ok(())
}

/// One indented line per kernel: `<registers> registers, <frame> B stack frame  <kernel>`.
fn print_resources(cubin: &[u8]) {
    match kernel_resources(cubin) {
        Ok(kernels) => {
            for k in kernels {
                println!(
                    "      {:3} registers, {:3} B stack frame  {}",
                    k.registers, k.frame_bytes, k.name
                );
            }
        }
        Err(e) => println!("      resources unreadable: {e:#}"),
    }
}
