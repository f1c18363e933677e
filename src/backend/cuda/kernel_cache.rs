//! Compiling the kernel files of `kernels/` to CUBIN, through an on-disk cache.
//!
//! A CUBIN is stored under a key that covers everything that shapes it: the `.cu` text and every
//! `.cuh` text it may include, the architecture, NVRTC's version and the full option list. So a
//! second compile of the same inputs reads the file and calls NVRTC not at all, and any change
//! (a kernel edit, a header edit, another NVRTC) compiles afresh. Old entries are never read
//! again; deleting the folder is always safe.
//!
//! The folder is `$BERTFT_CACHE/kernels/`, or `~/.cache/bertft-cuda/kernels/`. Entries are
//! written to a temporary name and renamed into place, so a reader (another process compiling
//! the same kernels) sees a whole file or none; a file that is not a whole CUBIN anyway (a crash
//! on a file system that reorders the rename before the data) is recompiled and replaced.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::cubin::kernel_names;
use super::nvrtc::{file_options, Arch, Nvrtc};
use crate::backend::kernel_sources::KERNEL_SOURCES;

/// Bumped when the way entries are keyed or stored changes.
const CACHE_FORMAT: &str = "bertft-cuda kernel cache 1";

/// The kernel files (`.cu`) of `kernels/`, sorted by name.
pub fn kernel_files() -> Vec<(&'static str, &'static str)> {
    KERNEL_SOURCES
        .iter()
        .copied()
        .filter(|(n, _)| n.ends_with(".cu"))
        .collect()
}

/// The headers (`.cuh`) of `kernels/`: every kernel file may include any of them.
pub fn kernel_headers() -> Vec<(&'static str, &'static str)> {
    KERNEL_SOURCES
        .iter()
        .copied()
        .filter(|(n, _)| n.ends_with(".cuh"))
        .collect()
}

/// The folder of compiled kernels.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// `$BERTFT_CACHE/kernels`, or `~/.cache/bertft-cuda/kernels`.
    pub fn default_dir() -> Result<PathBuf> {
        if let Some(dir) = std::env::var_os("BERTFT_CACHE").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir).join("kernels"));
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".cache/bertft-cuda/kernels")),
            None => bail!("no folder for the kernel cache: set BERTFT_CACHE (HOME is not set)"),
        }
    }

    /// The cache at [`KernelCache::default_dir`].
    pub fn open_default() -> Result<Self> {
        Ok(KernelCache::new(Self::default_dir()?))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry's file: `<stem>.<arch>.<key>.cubin`, the stem and arch for people looking in.
    fn entry(&self, file: &str, arch: Arch, key: &str) -> PathBuf {
        let stem: String = file
            .trim_end_matches(".cu")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{stem}.{arch}.{key}.cubin"))
    }

    /// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
    fn store(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(&self.dir).with_context(|| {
            format!(
                "cannot create the kernel cache {} (set BERTFT_CACHE to a writable folder)",
                self.dir.display()
            )
        })?;
        // Unique per process and per call: threads of one process may store the same entry.
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}.cubin",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "cannot write {} (set BERTFT_CACHE to a writable folder): {e}",
                path.display()
            );
        }
        Ok(())
    }
}

/// The kernels of one file, compiled for one architecture.
#[derive(Clone, Debug)]
pub struct CompiledKernels {
    pub file: String,
    pub arch: Arch,
    pub cubin: Vec<u8>,
    /// The kernels (`__global__` entry points) in the CUBIN.
    pub kernels: Vec<String>,
    /// Whether this came from the cache (NVRTC was not called).
    pub cached: bool,
    /// The cache entry it was read from or written to.
    pub cache_path: PathBuf,
    /// Time to read or compile it.
    pub elapsed: Duration,
}

/// Compiles kernel files with one NVRTC, through one cache, counting its NVRTC calls.
pub struct KernelCompiler<'a> {
    nvrtc: &'a Nvrtc,
    cache: KernelCache,
    nvrtc_calls: AtomicUsize,
}

impl<'a> KernelCompiler<'a> {
    pub fn new(nvrtc: &'a Nvrtc, cache: KernelCache) -> Self {
        KernelCompiler {
            nvrtc,
            cache,
            nvrtc_calls: AtomicUsize::new(0),
        }
    }

    pub fn cache(&self) -> &KernelCache {
        &self.cache
    }

    /// How many times this compiler has called NVRTC (cache hits do not).
    pub fn nvrtc_calls(&self) -> usize {
        self.nvrtc_calls.load(Ordering::Relaxed)
    }

    /// Compiles a kernel file of `kernels/`, with the headers of `kernels/`.
    pub fn compile_kernel_file(&self, file: &str, arch: Arch) -> Result<CompiledKernels> {
        let source = kernel_files()
            .into_iter()
            .find(|(n, _)| *n == file)
            .map(|(_, s)| s)
            .ok_or_else(|| anyhow!("no kernel file {file} in kernels/"))?;
        self.compile(file, source, &kernel_headers(), arch)
    }

    /// Compiles `source` (called `file`; its directive lines give extra options, see
    /// [`file_options`]) for `arch`, with `headers` as (include name, text), or reads the result
    /// of an identical earlier compile from the cache. A compile error is a
    /// [`super::nvrtc::CompileError`] (file, architecture, NVRTC's log).
    pub fn compile(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: Arch,
    ) -> Result<CompiledKernels> {
        let start = Instant::now();
        let extra = file_options(file, source)?;
        let options = self.nvrtc.options(arch, &extra);
        let key = cache_key(file, source, headers, arch, self.nvrtc.version(), &options);
        let path = self.cache.entry(file, arch, &key);
        let done = |cubin: Vec<u8>, kernels, cached| CompiledKernels {
            file: file.to_string(),
            arch,
            cubin,
            kernels,
            cached,
            cache_path: path.clone(),
            elapsed: start.elapsed(),
        };

        if let Ok(cubin) = std::fs::read(&path) {
            // An entry that does not parse is treated as absent, and replaced below.
            if let Ok(kernels) = kernel_names(&cubin) {
                return Ok(done(cubin, kernels, true));
            }
        }
        self.nvrtc_calls.fetch_add(1, Ordering::Relaxed);
        let cubin = self
            .nvrtc
            .compile_cubin(file, source, headers, arch, &extra)?;
        let kernels = kernel_names(&cubin)
            .with_context(|| format!("NVRTC's CUBIN of {file} for {arch} is unreadable"))?;
        self.cache.store(&path, &cubin)?;
        Ok(done(cubin, kernels, false))
    }
}

/// The first 128 bits of the SHA-256 of every input, in hex. Each field is length-prefixed, so
/// no two different inputs run together into the same bytes.
fn cache_key(
    file: &str,
    source: &str,
    headers: &[(&str, &str)],
    arch: Arch,
    nvrtc_version: (u32, u32),
    options: &[String],
) -> String {
    let mut material = Vec::new();
    let mut field = |bytes: &[u8]| {
        material.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        material.extend_from_slice(bytes);
    };
    field(CACHE_FORMAT.as_bytes());
    field(file.as_bytes());
    field(source.as_bytes());
    let mut sorted = headers.to_vec();
    sorted.sort();
    for (name, text) in sorted {
        field(name.as_bytes());
        field(text.as_bytes());
    }
    field(arch.to_string().as_bytes());
    field(format!("{}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    for o in options {
        field(o.as_bytes());
    }
    sha256(&material)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 (FIPS 180-4), enough for cache keys without another dependency.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    // Padding: a 1 bit, zeros to 56 mod 64 bytes, the message length in bits (big-endian).
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Two blocks (56 bytes: the padding spills into a second block).
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn key_changes_with_every_input() {
        let sm90: Arch = "sm_90".parse().unwrap();
        let opts = vec!["--std=c++17".to_string()];
        let base = cache_key("a.cu", "src", &[("h.cuh", "x")], sm90, (13, 0), &opts);
        assert_eq!(base.len(), 32);
        let variants = [
            cache_key("b.cu", "src", &[("h.cuh", "x")], sm90, (13, 0), &opts),
            cache_key("a.cu", "src2", &[("h.cuh", "x")], sm90, (13, 0), &opts),
            cache_key("a.cu", "src", &[("h.cuh", "y")], sm90, (13, 0), &opts),
            cache_key("a.cu", "src", &[], sm90, (13, 0), &opts),
            cache_key(
                "a.cu",
                "src",
                &[("h.cuh", "x")],
                "sm_80".parse().unwrap(),
                (13, 0),
                &opts,
            ),
            cache_key("a.cu", "src", &[("h.cuh", "x")], sm90, (13, 1), &opts),
            cache_key("a.cu", "src", &[("h.cuh", "x")], sm90, (13, 0), &[]),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
        // Header order does not matter.
        assert_eq!(
            cache_key("a.cu", "s", &[("a", "1"), ("b", "2")], sm90, (13, 0), &opts),
            cache_key("a.cu", "s", &[("b", "2"), ("a", "1")], sm90, (13, 0), &opts)
        );
    }

    #[test]
    fn entry_names_are_readable_and_safe() {
        let cache = KernelCache::new("/c");
        let p = cache.entry("../weird name.cu", "sm_90a".parse().unwrap(), "k");
        assert_eq!(p, Path::new("/c/___weird_name.sm_90a.k.cubin"));
    }

    #[test]
    fn store_replaces_atomically() {
        let dir = std::env::temp_dir().join(format!("bertft-kcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = KernelCache::new(dir.join("kernels"));
        let p = cache.dir().join("x.cubin");
        cache.store(&p, b"one").unwrap();
        cache.store(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
