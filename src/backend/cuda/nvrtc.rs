//! NVRTC: compiling CUDA C++ to CUBIN (machine code for one real architecture) at run time.
//!
//! CUBIN, not PTX: the driver has to JIT PTX, and PTX from NVRTC 13 may carry a PTX ISA version
//! newer than an older driver understands, while a CUBIN for the GPU's own `sm_XX` loads as is.
//!
//! Every compile gets `--gpu-architecture=sm_XX --std=c++17 -default-device -I<CUDA headers>`,
//! and the `.cuh` files of `kernels/` as in-memory headers (so `#include "common.cuh"` needs no
//! folder on disk). Anything more is a per-file opt-in, written in the `.cu` file itself as a
//! directive line (see [`file_options`]), e.g. `// nvrtc-options: --use_fast_math`.

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::sys::nvrtcProgram;

use super::libs::{OpenLib, Search, SearchEnv, CUDA_MAJOR};

/// NVRTC's functions, taken from the library found here (not through cudarc: cudarc opens
/// `libnvrtc.so` first when the loader has one, which may be another copy than the one found;
/// see `libs`). Results are plain ints (0 = NVRTC_SUCCESS) so that a code newer than these
/// bindings is still just an error.
#[derive(Debug)]
struct Fns {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int,
    get_num_supported_archs: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_supported_archs: unsafe extern "C" fn(*mut c_int) -> c_int,
    create_program: unsafe extern "C" fn(
        *mut nvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile_program: unsafe extern "C" fn(nvrtcProgram, c_int, *const *const c_char) -> c_int,
    get_program_log_size: unsafe extern "C" fn(nvrtcProgram, *mut usize) -> c_int,
    get_program_log: unsafe extern "C" fn(nvrtcProgram, *mut c_char) -> c_int,
    get_cubin_size: unsafe extern "C" fn(nvrtcProgram, *mut usize) -> c_int,
    get_cubin: unsafe extern "C" fn(nvrtcProgram, *mut c_char) -> c_int,
    destroy_program: unsafe extern "C" fn(*mut nvrtcProgram) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Fns {
    fn load(lib: &OpenLib) -> Result<Self> {
        // SAFETY: each type is the function's signature in nvrtc.h (CUDA 11 to 13); the
        // pointers are used only while `lib` (kept beside them in Nvrtc) is open.
        unsafe {
            Ok(Fns {
                version: lib.function("NVRTC", "nvrtcVersion")?,
                get_num_supported_archs: lib.function("NVRTC", "nvrtcGetNumSupportedArchs")?,
                get_supported_archs: lib.function("NVRTC", "nvrtcGetSupportedArchs")?,
                create_program: lib.function("NVRTC", "nvrtcCreateProgram")?,
                compile_program: lib.function("NVRTC", "nvrtcCompileProgram")?,
                get_program_log_size: lib.function("NVRTC", "nvrtcGetProgramLogSize")?,
                get_program_log: lib.function("NVRTC", "nvrtcGetProgramLog")?,
                get_cubin_size: lib.function("NVRTC", "nvrtcGetCUBINSize")?,
                get_cubin: lib.function("NVRTC", "nvrtcGetCUBIN")?,
                destroy_program: lib.function("NVRTC", "nvrtcDestroyProgram")?,
                get_error_string: lib.function("NVRTC", "nvrtcGetErrorString")?,
            })
        }
    }

    /// NVRTC's result as a Result, in NVRTC's own words.
    fn check(&self, r: c_int) -> std::result::Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static string for any code ("NVRTC_ERROR unknown" for one it
        // does not know).
        let msg = unsafe { (self.get_error_string)(r) };
        if msg.is_null() {
            return Err(format!("NVRTC error {r}"));
        }
        Err(unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned())
    }

    /// [`Fns::check`] for calls whose failure ends the operation: an error naming the call.
    fn call(&self, what: &str, r: c_int) -> Result<()> {
        self.check(r).map_err(|e| anyhow!("{what}: {e}"))
    }
}

/// The headers every kernel may include from the toolkit.
pub const CUDA_HEADERS: [&str; 2] = ["cuda_fp16.h", "cuda_bf16.h"];

/// The directive line that gives a kernel file extra NVRTC options.
pub const OPTIONS_DIRECTIVE: &str = "// nvrtc-options:";

/// A real GPU architecture, `sm_<major><minor>[a|f]` (`sm_80`, `sm_90`, `sm_90a`, `sm_100f`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// `major * 10 + minor`, as NVRTC numbers them (`90` for sm_90).
    pub number: u32,
    /// `a` (architecture-specific features) or `f` (family-specific), when given.
    pub suffix: Option<char>,
}

impl Arch {
    /// The architecture of a GPU of compute capability `major.minor`.
    pub fn from_compute_capability(major: u32, minor: u32) -> Self {
        Arch {
            number: major * 10 + minor,
            suffix: None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}", self.number)?;
        if let Some(s) = self.suffix {
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl FromStr for Arch {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            anyhow!("invalid GPU architecture {s:?}: expected sm_<major><minor>, e.g. sm_80, sm_90, sm_90a")
        };
        let rest = s.strip_prefix("sm_").ok_or_else(bad)?;
        let (digits, suffix) = match rest.strip_suffix(['a', 'f']) {
            Some(d) => (d, rest.chars().last()),
            None => (rest, None),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Arch {
            number: digits.parse().map_err(|_| bad())?,
            suffix,
        })
    }
}

/// A failed compilation: the file, the architecture and NVRTC's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub file: String,
    pub arch: Arch,
    /// NVRTC's program log (its error and warning lines), or what failed before compiling.
    pub log: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not compile for {}:", self.file, self.arch)?;
        for line in self.log.lines().filter(|l| !l.trim().is_empty()) {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CompileError {}

/// The extra NVRTC options a kernel file asks for, from its directive lines: every line that
/// starts with `// nvrtc-options:` adds its whitespace-separated options, each starting with
/// `-` (`// nvrtc-options: --use_fast_math`). They are the only way to get an option such as
/// `--use_fast_math`, so approximate math is always a visible choice of one file.
pub fn file_options(file: &str, source: &str) -> Result<Vec<String>> {
    let mut options = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix(OPTIONS_DIRECTIVE) else {
            continue;
        };
        for opt in rest.split_whitespace() {
            if !opt.starts_with('-') {
                bail!(
                    "{file}:{}: {OPTIONS_DIRECTIVE} expects options such as --use_fast_math, found {opt:?}",
                    n + 1
                );
            }
            options.push(opt.to_string());
        }
    }
    Ok(options)
}

/// NVRTC, opened and checked: the library, its builtins, the CUDA headers, its version.
#[derive(Debug)]
pub struct Nvrtc {
    fns: Fns,
    lib: OpenLib,
    builtins: OpenLib,
    include_dir: PathBuf,
    version: (u32, u32),
    supported: Vec<u32>,
}

static PROCESS_NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

/// This process's NVRTC, found through its environment on first use (see `libs`).
pub fn nvrtc() -> Result<&'static Nvrtc> {
    PROCESS_NVRTC
        .get_or_init(|| Nvrtc::load(&SearchEnv::from_process()).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

impl Nvrtc {
    /// Finds NVRTC, its builtins and the CUDA headers in `env`'s places and opens them.
    pub fn load(env: &SearchEnv) -> Result<Self> {
        let search = Search::new(env);
        let soname = format!("libnvrtc.so.{CUDA_MAJOR}");
        let path = search.find_lib("NVRTC", &soname)?;
        let include_dir = search.find_include_dir(&CUDA_HEADERS)?;
        let lib = OpenLib::open("NVRTC", &path)?;
        let fns = Fns::load(&lib)?;

        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        fns.call("nvrtcVersion", unsafe {
            (fns.version)(&mut major, &mut minor)
        })?;
        let version = (major as u32, minor as u32);

        // NVRTC opens its builtins by soname when it first compiles, with no search path of its
        // own: open it here, from beside libnvrtc, so that open finds it loaded.
        let builtins_name = format!("libnvrtc-builtins.so.{major}.{minor}");
        let beside = path.with_file_name(&builtins_name);
        let builtins_path = if beside.is_file() {
            beside
        } else {
            search
                .find_lib("the NVRTC builtins", &builtins_name)
                .with_context(|| format!("NVRTC {major}.{minor} at {} needs it", path.display()))?
        };
        let builtins = OpenLib::open("the NVRTC builtins", &builtins_path)?;

        let mut n = 0;
        // SAFETY: out-parameter, then a buffer of the size it gave.
        fns.call("nvrtcGetNumSupportedArchs", unsafe {
            (fns.get_num_supported_archs)(&mut n)
        })?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        fns.call("nvrtcGetSupportedArchs", unsafe {
            (fns.get_supported_archs)(archs.as_mut_ptr())
        })?;

        Ok(Nvrtc {
            fns,
            lib,
            builtins,
            include_dir,
            version,
            supported: archs.into_iter().map(|a| a as u32).collect(),
        })
    }

    /// (major, minor), e.g. (13, 0).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    pub fn path(&self) -> &Path {
        self.lib.path()
    }

    pub fn builtins_path(&self) -> &Path {
        self.builtins.path()
    }

    /// The folder with `cuda_fp16.h` and `cuda_bf16.h`, given to every compile as `-I`.
    pub fn include_dir(&self) -> &Path {
        &self.include_dir
    }

    /// The architecture numbers this NVRTC compiles for (75, 80, …, 90, …).
    pub fn supported_archs(&self) -> &[u32] {
        &self.supported
    }

    /// The options a compile of a file with `extra` options (see [`file_options`]) for `arch`
    /// passes to NVRTC.
    pub fn options(&self, arch: Arch, extra: &[String]) -> Vec<String> {
        let mut opts = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
            "-default-device".to_string(),
            format!("-I{}", self.include_dir.display()),
        ];
        opts.extend(extra.iter().cloned());
        opts
    }

    /// Compiles `source` (named `file` in messages) for `arch` and returns the CUBIN. `headers`
    /// are (include name, text) pairs that `#include "name"` resolves to.
    pub fn compile_cubin(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: Arch,
        extra: &[String],
    ) -> std::result::Result<Vec<u8>, CompileError> {
        let fail = |log: String| CompileError {
            file: file.to_string(),
            arch,
            log,
        };
        if !self.supported.contains(&arch.number) {
            let list: Vec<String> = self.supported.iter().map(|a| format!("sm_{a}")).collect();
            return Err(fail(format!(
                "NVRTC {}.{} does not compile for {arch} (it does: {})",
                self.version.0,
                self.version.1,
                list.join(", ")
            )));
        }
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| fail(format!("{what} contains a NUL byte")))
        };
        let c_source = cstr("the source", source)?;
        let c_name = cstr("the file name", file)?;
        let c_headers = headers
            .iter()
            .map(|(n, t)| Ok((cstr(n, n)?, cstr(n, t)?)))
            .collect::<std::result::Result<Vec<_>, CompileError>>()?;
        let header_texts: Vec<*const c_char> = c_headers.iter().map(|(_, t)| t.as_ptr()).collect();
        let header_names: Vec<*const c_char> = c_headers.iter().map(|(n, _)| n.as_ptr()).collect();
        let c_options = self
            .options(arch, extra)
            .iter()
            .map(|o| cstr("an option", o))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();

        let f = &self.fns;
        let mut prog: nvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer is to a live NUL-terminated string; the arrays have the length
        // given; NVRTC copies what it keeps.
        f.check(unsafe {
            (f.create_program)(
                &mut prog,
                c_source.as_ptr(),
                c_name.as_ptr(),
                header_texts.len() as c_int,
                header_texts.as_ptr(),
                header_names.as_ptr(),
            )
        })
        .map_err(|e| fail(format!("nvrtcCreateProgram: {e}")))?;
        let prog = Program { fns: f, prog };

        // SAFETY: a program created above; the option array outlives the call.
        let compiled = f.check(unsafe {
            (f.compile_program)(prog.prog, option_ptrs.len() as c_int, option_ptrs.as_ptr())
        });
        if let Err(e) = compiled {
            let log = prog.log().unwrap_or_default();
            return Err(fail(if log.trim().is_empty() { e } else { log }));
        }
        let mut size = 0usize;
        // SAFETY: a compiled program; the buffer has the size NVRTC gave.
        f.check(unsafe { (f.get_cubin_size)(prog.prog, &mut size) })
            .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e}")))?;
        let mut cubin = vec![0u8; size];
        f.check(unsafe { (f.get_cubin)(prog.prog, cubin.as_mut_ptr().cast()) })
            .map_err(|e| fail(format!("nvrtcGetCUBIN: {e}")))?;
        Ok(cubin)
    }
}

/// An NVRTC program, destroyed on drop.
struct Program<'a> {
    fns: &'a Fns,
    prog: nvrtcProgram,
}

impl Program<'_> {
    fn log(&self) -> std::result::Result<String, String> {
        let f = self.fns;
        let mut size = 0usize;
        // SAFETY: a live program; the buffer has the size NVRTC gave.
        f.check(unsafe { (f.get_program_log_size)(self.prog, &mut size) })?;
        let mut buf = vec![0u8; size.max(1)];
        f.check(unsafe { (f.get_program_log)(self.prog, buf.as_mut_ptr().cast()) })?;
        Ok(CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default())
    }
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once.
        unsafe {
            (self.fns.destroy_program)(&mut self.prog);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parses_and_prints() {
        for s in ["sm_80", "sm_90", "sm_90a", "sm_100f", "sm_120"] {
            assert_eq!(s.parse::<Arch>().unwrap().to_string(), s);
        }
        assert_eq!("sm_86".parse::<Arch>().unwrap().number, 86);
        assert_eq!(Arch::from_compute_capability(9, 0).to_string(), "sm_90");
        for bad in [
            "90",
            "sm90",
            "sm_",
            "sm_9",
            "compute_90",
            "sm_9x",
            "sm_90b",
            "sm_a",
        ] {
            let e = bad.parse::<Arch>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("sm_90"), "{bad}: {e}");
        }
    }

    #[test]
    fn options_come_only_from_directive_lines() {
        let src = "// nvrtc-options: --use_fast_math\n  // nvrtc-options: -lineinfo --extra-device-vectorization\n\
                   // a comment about --use_fast_math\nextern \"C\" __global__ void k() {}\n";
        assert_eq!(
            file_options("k.cu", src).unwrap(),
            [
                "--use_fast_math",
                "-lineinfo",
                "--extra-device-vectorization"
            ]
        );
        assert!(file_options("k.cu", "__global__ void k() {}")
            .unwrap()
            .is_empty());
        let e = file_options("k.cu", "\n// nvrtc-options: use_fast_math\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("k.cu:2: "), "{e}");
    }

    #[test]
    fn compile_error_prints_file_arch_and_log() {
        let e = CompileError {
            file: "bad.cu".into(),
            arch: "sm_90".parse().unwrap(),
            log: "bad.cu(3): error: expected a \";\"\n\n1 error detected\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "bad.cu does not compile for sm_90:\n  bad.cu(3): error: expected a \";\"\n  1 error detected"
        );
    }
}
