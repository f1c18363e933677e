//! Embeds the CUDA sources of `kernels/` into the binary. They are compiled at run time by
//! NVRTC for the GPU at hand, so building the crate needs no CUDA toolkit.

use std::path::Path;
use std::{env, fs};

fn main() {
    // The manifest folder of this run (cargo sets it for every build-script run), not the one
    // the build script was compiled in: a target folder shared or copied between checkouts
    // would otherwise embed another checkout's kernels.
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut sources: Vec<_> = fs::read_dir(&dir)
        .expect("kernels/ exists")
        .map(|e| e.expect("readable kernels/ entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    let mut code = String::from("/// The CUDA sources in `kernels/`: (file name, text).\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path
            .file_name()
            .unwrap()
            .to_str()
            .expect("UTF-8 kernel file name");
        code += &format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        );
    }
    code += "];\n";
    let out =
        Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernel_sources.rs");
    fs::write(out, code).expect("OUT_DIR is writable");
}
