//! Finding and opening the CUDA libraries: NVRTC (and its builtins), cuBLAS/cuBLASLt, the CUDA
//! runtime, the driver, and the headers NVRTC needs (`cuda_fp16.h`, `cuda_bf16.h`).
//!
//! Where they are looked for, first hit wins:
//! 1. `BERTFT_CUDA_WHEELS`: a folder holding `nvidia/cu13/{lib,include}`, as the unzipped pip
//!    wheels `nvidia-cuda-nvrtc` / `nvidia-cuda-runtime` / `nvidia-cublas` lay them out
//!    (`tests/run.sh` provides one);
//! 2. the toolkits at `CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`;
//! 3. pip wheels in the usual Python package folders: `$VIRTUAL_ENV`, `$CONDA_PREFIX`,
//!    `~/.local/lib/python3*/site-packages`, `/usr/local/lib/python3*/{dist,site}-packages`,
//!    `/usr/lib/python3/dist-packages`, `/usr/lib/python3*/site-packages`;
//! 4. the directories of `LD_LIBRARY_PATH`, then the system's (`/usr/lib/x86_64-linux-gnu`, …,
//!    headers in `/usr/include`).
//!
//! cudarc, built with `dynamic-loading`, opens each library itself the first time one of its
//! functions is called, trying a list of names in order (`libcublas.so`, …, `libcublas.so.13`,
//! …), and panics when none opens or a symbol is missing. So:
//! - each library found here is opened by full path first and kept open for the life of the
//!   process, so that cudarc's open by soname finds it already loaded even when it is in no
//!   folder the dynamic loader searches (pip wheels, a toolkit not on `LD_LIBRARY_PATH`);
//! - cudarc's list starts with the unversioned name, which the loader may resolve to another
//!   copy (a toolkit's `libcublas.so` in the loader's cache while ours came from the wheels), so
//!   what cudarc actually opened is then checked ([`check_cudarc_library`]): every symbol it will
//!   look up must be there (its major version is checked by the caller), and its real path is
//!   what gets reported;
//! - NVRTC is not called through cudarc at all (see `nvrtc`), so the one compiling is exactly
//!   the one found here.
//!
//! Either way, a missing or unusable piece is a one-line error, never a panic.

use std::ffi::{c_char, c_int, c_void, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

/// The CUDA major version of the libraries looked for; cudarc's bindings are pinned to 13.0.
pub const CUDA_MAJOR: u32 = 13;

/// The variables that name where CUDA is, in search order.
const LOCATION_VARS: [&str; 3] = ["BERTFT_CUDA_WHEELS", "CUDA_HOME", "CUDA_PATH"];

/// The advice appended to every "not found" error.
pub const INSTALL_HINT: &str =
    "set CUDA_HOME to a CUDA 13 toolkit, or BERTFT_CUDA_WHEELS to a folder holding \
nvidia/cu13 from unzipped NVIDIA wheels: nvidia-cuda-nvrtc, nvidia-cuda-runtime, nvidia-cublas \
(tests/run.sh fetches the first two)";

/// One place CUDA may be installed: its library and header folders, and how it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchRoot {
    /// Where this place came from, for messages: `CUDA_HOME=/opt/cuda`, `/usr/local/cuda`, ….
    pub origin: String,
    pub lib_dirs: Vec<PathBuf>,
    pub include_dirs: Vec<PathBuf>,
}

/// What the search reads from the outside world: environment variables and the file system
/// below `system_root` ("/" for real; a fake tree in tests).
#[derive(Clone, Debug)]
pub struct SearchEnv {
    vars: Vec<(String, OsString)>,
    system_root: PathBuf,
}

impl SearchEnv {
    /// This process's environment and the real file system.
    pub fn from_process() -> Self {
        let names =
            LOCATION_VARS
                .iter()
                .chain(&["VIRTUAL_ENV", "CONDA_PREFIX", "HOME", "LD_LIBRARY_PATH"]);
        let vars = names
            .filter_map(|&n| std::env::var_os(n).map(|v| (n.to_string(), v)))
            .collect();
        SearchEnv {
            vars,
            system_root: PathBuf::from("/"),
        }
    }

    /// Given variables, with the system folders (`/usr/local/cuda`, `/usr/lib/…`) taken below
    /// `system_root`.
    pub fn new<K: Into<String>, V: Into<OsString>>(
        vars: impl IntoIterator<Item = (K, V)>,
        system_root: impl Into<PathBuf>,
    ) -> Self {
        SearchEnv {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            system_root: system_root.into(),
        }
    }

    fn var(&self, name: &str) -> Option<&OsString> {
        self.vars
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v)
    }

    fn system(&self, abs: &str) -> PathBuf {
        self.system_root.join(abs.trim_start_matches('/'))
    }

    /// Every place to look, in order (see the module documentation).
    pub fn roots(&self) -> Vec<SearchRoot> {
        let mut roots = Vec::new();
        if let Some(dir) = self.var("BERTFT_CUDA_WHEELS") {
            roots.push(wheel_root(
                format!("BERTFT_CUDA_WHEELS={}", Path::new(dir).display()),
                Path::new(dir),
            ));
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(dir) = self.var(var) {
                roots.push(toolkit_root(
                    format!("{var}={}", Path::new(dir).display()),
                    Path::new(dir),
                ));
            }
        }
        roots.push(toolkit_root(
            "/usr/local/cuda".into(),
            &self.system("/usr/local/cuda"),
        ));

        let mut site_dirs = Vec::new();
        for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
            if let Some(prefix) = self.var(var) {
                site_dirs.extend(python_dirs(&Path::new(prefix).join("lib"), "site-packages"));
            }
        }
        if let Some(home) = self.var("HOME") {
            site_dirs.extend(python_dirs(
                &Path::new(home).join(".local/lib"),
                "site-packages",
            ));
        }
        let usr_local_lib = self.system("/usr/local/lib");
        site_dirs.extend(python_dirs(&usr_local_lib, "dist-packages"));
        site_dirs.extend(python_dirs(&usr_local_lib, "site-packages"));
        site_dirs.push(self.system("/usr/lib/python3/dist-packages"));
        site_dirs.extend(python_dirs(&self.system("/usr/lib"), "site-packages"));
        for dir in site_dirs {
            roots.push(wheel_root(dir.display().to_string(), &dir));
        }

        if let Some(paths) = self.var("LD_LIBRARY_PATH") {
            let lib_dirs: Vec<PathBuf> = std::env::split_paths(paths)
                .filter(|p| !p.as_os_str().is_empty())
                .collect();
            if !lib_dirs.is_empty() {
                roots.push(SearchRoot {
                    origin: "LD_LIBRARY_PATH".into(),
                    lib_dirs,
                    include_dirs: Vec::new(),
                });
            }
        }
        let multiarch = format!("/usr/lib/{}-linux-gnu", std::env::consts::ARCH);
        roots.push(SearchRoot {
            origin: "the system folders".into(),
            lib_dirs: [multiarch.as_str(), "/usr/lib64", "/usr/lib"]
                .iter()
                .map(|d| self.system(d))
                .collect(),
            include_dirs: vec![self.system("/usr/include")],
        });
        roots
    }

    /// The location variables that are not set, for "not found" messages.
    fn unset_vars(&self) -> Vec<&'static str> {
        LOCATION_VARS
            .iter()
            .copied()
            .filter(|v| self.var(v).is_none())
            .collect()
    }
}

/// A toolkit installation: `lib64/`, `lib/`, `targets/<arch>-linux/lib/`, and the same for
/// `include/`.
fn toolkit_root(origin: String, dir: &Path) -> SearchRoot {
    let target = dir.join(format!("targets/{}-linux", toolkit_target_arch()));
    SearchRoot {
        origin,
        lib_dirs: vec![dir.join("lib64"), dir.join("lib"), target.join("lib")],
        include_dirs: vec![dir.join("include"), target.join("include")],
    }
}

/// The toolkit's name for this CPU in `targets/` (aarch64 servers are "sbsa").
fn toolkit_target_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "sbsa",
        other => other,
    }
}

/// A folder holding pip's `nvidia/` package: the CUDA 13 wheels all unpack into `nvidia/cu13/`.
fn wheel_root(origin: String, dir: &Path) -> SearchRoot {
    let cu = dir.join(format!("nvidia/cu{CUDA_MAJOR}"));
    SearchRoot {
        origin,
        lib_dirs: vec![cu.join("lib")],
        include_dirs: vec![cu.join("include")],
    }
}

/// `<lib>/python3*/<leaf>`, newest Python first.
fn python_dirs(lib: &Path, leaf: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    let mut dirs: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let minor = name.strip_prefix("python3")?;
            // "python3", "python3.12": order by the numbers so 3.12 comes before 3.9.
            let key = minor
                .trim_start_matches('.')
                .split('.')
                .map(|n| n.parse().unwrap_or(0))
                .collect();
            Some((key, lib.join(&name).join(leaf)))
        })
        .filter(|(_, d)| d.is_dir())
        .collect();
    dirs.sort();
    dirs.into_iter().rev().map(|(_, d)| d).collect()
}

/// The result of looking for one thing in every root.
#[derive(Debug)]
pub struct Search<'a> {
    env: &'a SearchEnv,
    roots: Vec<SearchRoot>,
}

impl<'a> Search<'a> {
    pub fn new(env: &'a SearchEnv) -> Self {
        Search {
            env,
            roots: env.roots(),
        }
    }

    pub fn roots(&self) -> &[SearchRoot] {
        &self.roots
    }

    /// The first library folder holding a file named `file`.
    pub fn find_lib(&self, what: &str, file: &str) -> Result<PathBuf> {
        let dirs: Vec<&PathBuf> = self.roots.iter().flat_map(|r| &r.lib_dirs).collect();
        match dirs.iter().map(|d| d.join(file)).find(|p| p.is_file()) {
            Some(p) => Ok(p),
            None => bail!("{}", self.not_found(what, file, &dirs)),
        }
    }

    /// The first header folder holding every one of `headers`.
    pub fn find_include_dir(&self, headers: &[&str]) -> Result<PathBuf> {
        let dirs: Vec<&PathBuf> = self.roots.iter().flat_map(|r| &r.include_dirs).collect();
        match dirs
            .iter()
            .find(|d| headers.iter().all(|h| d.join(h).is_file()))
        {
            Some(d) => Ok(d.to_path_buf()),
            None => bail!(
                "{}",
                self.not_found("the CUDA headers", &headers.join(" and "), &dirs)
            ),
        }
    }

    /// "`what` not found: no `file` in a, b, c (CUDA_HOME … unset; advice)".
    fn not_found(&self, what: &str, file: &str, dirs: &[&PathBuf]) -> String {
        let mut msg = format!("{what} not found: no {file} in ");
        let mut seen = Vec::new();
        for d in dirs {
            if !seen.contains(d) {
                seen.push(*d);
            }
        }
        for (i, d) in seen.iter().enumerate() {
            let _ = write!(msg, "{}{}", if i > 0 { ", " } else { "" }, d.display());
        }
        msg += " (";
        let unset = self.env.unset_vars();
        if !unset.is_empty() {
            let _ = write!(msg, "{} unset; ", unset.join(", "));
        }
        msg += INSTALL_HINT;
        msg += ")";
        msg
    }
}

/// A shared library opened by full path, kept open for as long as this value lives (the
/// process-wide ones live in statics, for cudarc's sake).
#[derive(Debug)]
pub struct OpenLib {
    path: PathBuf,
    lib: libloading::Library,
}

impl OpenLib {
    pub fn open(what: &str, path: &Path) -> Result<Self> {
        // SAFETY: the CUDA libraries' initializers only set up their own state.
        match unsafe { libloading::Library::new(path) } {
            Ok(lib) => Ok(OpenLib {
                path: path.to_path_buf(),
                lib,
            }),
            Err(e) => bail!(
                "cannot load {what} from {}: {}",
                path.display(),
                dl_error(&e)
            ),
        }
    }

    /// Opens a library by soname, through the dynamic loader's own search (the driver lives
    /// in the system's library folders, placed there by the GPU driver's installer).
    pub fn open_soname(soname: &str) -> Result<Self> {
        // SAFETY: as above.
        let lib =
            unsafe { libloading::Library::new(soname) }.map_err(|e| anyhow!("{}", dl_error(&e)))?;
        Ok(OpenLib {
            path: PathBuf::from(soname),
            lib,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn library(&self) -> &libloading::Library {
        &self.lib
    }

    /// The function `name`, typed as `F` (an `unsafe extern "C" fn` type).
    ///
    /// # Safety
    /// `F` must be the function's true signature. The pointer is valid while `self` lives.
    pub unsafe fn function<F: Copy>(&self, what: &str, name: &str) -> Result<F> {
        match self.lib.get::<F>(name.as_bytes()) {
            Ok(f) => Ok(*f),
            Err(_) => bail!("{}", missing_function(what, &self.path, name)),
        }
    }
}

fn missing_function(what: &str, path: &Path, name: &str) -> String {
    format!(
        "{what} at {} lacks the function {name} (older than CUDA {CUDA_MAJOR}.0, or not {what}?)",
        path.display()
    )
}

/// Checks the library cudarc opened (`lib`, from its `sys::culib()`, for cudarc's library name
/// `cudarc_name`, e.g. "cublas"): fails naming the first of `symbols` it lacks, else returns
/// its real path. Every symbol cudarc will be asked for must be in `symbols`, since cudarc
/// panics on a missing one.
pub fn check_cudarc_library(
    what: &str,
    cudarc_name: &str,
    lib: &libloading::Library,
    symbols: &[&str],
) -> Result<PathBuf> {
    let path = library_path(lib, symbols).unwrap_or_else(|| {
        // No symbol to ask the loader about: name the file cudarc opened by the first of its
        // candidate names that opens, as cudarc did.
        let opened = cudarc::get_lib_name_candidates(cudarc_name)
            .into_iter()
            // SAFETY: opening an already-loaded library only bumps its count.
            .find(|n| unsafe { libloading::Library::new(n) }.is_ok())
            .unwrap_or_else(|| cudarc_name.to_string());
        PathBuf::from(opened)
    });
    for name in symbols {
        // SAFETY: only the address is read.
        if unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_err() {
            bail!(
                "{}; cudarc opens it by name, so the first of that name on the dynamic loader's \
                 path is used",
                missing_function(what, &path, name)
            );
        }
    }
    Ok(path)
}

#[repr(C)]
struct DlInfo {
    dli_fname: *const c_char,
    dli_fbase: *mut c_void,
    dli_sname: *const c_char,
    dli_saddr: *mut c_void,
}

// libloading links the loader library (libdl) already; this is one more function of it.
#[cfg_attr(all(target_os = "linux", target_env = "gnu"), link(name = "dl"))]
extern "C" {
    fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
}

/// The file `lib` was loaded from, found through the address of one of its `symbols` (a
/// handle does not say; the loader does, given an address inside the library).
fn library_path(lib: &libloading::Library, symbols: &[&str]) -> Option<PathBuf> {
    let addr = symbols
        .iter()
        // SAFETY: only the address is read.
        .find_map(|n| {
            unsafe { lib.get::<*const c_void>(n.as_bytes()) }
                .ok()
                .map(|s| *s)
        })?;
    let mut info = std::mem::MaybeUninit::<DlInfo>::uninit();
    // SAFETY: `addr` is inside a loaded library; dladdr fills `info` when it returns non-zero,
    // and dli_fname then points to the loader's own copy of the path.
    unsafe {
        if dladdr(addr, info.as_mut_ptr()) == 0 {
            return None;
        }
        let info = info.assume_init();
        if info.dli_fname.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(info.dli_fname);
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
    }
}

/// libloading's error with the loader's own words (which libloading keeps as its source).
fn dl_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake file-system tree, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("bertft-cuda-libs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Tree(dir)
        }

        fn touch(&self, rel: &str) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"").unwrap();
            p
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NO_VARS: [(&str, &str); 0] = [];

    #[test]
    fn wheels_folder_comes_before_toolkits() {
        let t = Tree::new("order");
        t.touch("sys/usr/local/cuda/lib64/libnvrtc.so.13");
        let wheel = t.touch("wheels/nvidia/cu13/lib/libnvrtc.so.13");
        let env = SearchEnv::new(
            [("BERTFT_CUDA_WHEELS", t.0.join("wheels"))],
            t.0.join("sys"),
        );
        let found = Search::new(&env)
            .find_lib("NVRTC", "libnvrtc.so.13")
            .unwrap();
        assert_eq!(found, wheel);
        assert!(env.roots()[0].origin.starts_with("BERTFT_CUDA_WHEELS="));
    }

    #[test]
    fn cuda_home_comes_before_usr_local_cuda_and_reads_targets_dirs() {
        let t = Tree::new("home");
        t.touch("sys/usr/local/cuda/lib64/libcublas.so.13");
        let mine = t.touch(&format!(
            "opt/cuda/targets/{}-linux/lib/libcublas.so.13",
            toolkit_target_arch()
        ));
        let env = SearchEnv::new([("CUDA_HOME", t.0.join("opt/cuda"))], t.0.join("sys"));
        let found = Search::new(&env)
            .find_lib("cuBLAS", "libcublas.so.13")
            .unwrap();
        assert_eq!(found, mine);
    }

    #[test]
    fn usr_local_cuda_is_searched_without_variables() {
        let t = Tree::new("usrlocal");
        let lib = t.touch("usr/local/cuda/lib64/libnvrtc.so.13");
        t.touch("usr/local/cuda/include/cuda_fp16.h");
        t.touch("usr/local/cuda/include/cuda_bf16.h");
        let env = SearchEnv::new(NO_VARS, &t.0);
        let search = Search::new(&env);
        assert_eq!(search.find_lib("NVRTC", "libnvrtc.so.13").unwrap(), lib);
        assert_eq!(
            search
                .find_include_dir(&["cuda_fp16.h", "cuda_bf16.h"])
                .unwrap(),
            t.0.join("usr/local/cuda/include")
        );
    }

    #[test]
    fn user_site_packages_newest_python_first() {
        let t = Tree::new("site");
        t.touch("home/u/.local/lib/python3.9/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let newest =
            t.touch("home/u/.local/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let env = SearchEnv::new([("HOME", t.0.join("home/u"))], t.0.join("sys"));
        assert_eq!(
            Search::new(&env)
                .find_lib("NVRTC", "libnvrtc.so.13")
                .unwrap(),
            newest
        );
    }

    #[test]
    fn system_dist_packages_and_virtualenv() {
        let t = Tree::new("dist");
        let system = t.touch("usr/lib/python3/dist-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let env = SearchEnv::new(NO_VARS, &t.0);
        assert_eq!(
            Search::new(&env)
                .find_lib("NVRTC", "libnvrtc.so.13")
                .unwrap(),
            system
        );
        let venv = t.touch("venv/lib/python3.11/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let env = SearchEnv::new([("VIRTUAL_ENV", t.0.join("venv"))], &t.0);
        assert_eq!(
            Search::new(&env)
                .find_lib("NVRTC", "libnvrtc.so.13")
                .unwrap(),
            venv
        );
    }

    #[test]
    fn headers_need_both_files_in_one_folder() {
        let t = Tree::new("headers");
        // The first folder has only one of the two headers, so the second one is chosen.
        t.touch("wheels/nvidia/cu13/include/cuda_fp16.h");
        t.touch("cuda/include/cuda_fp16.h");
        t.touch("cuda/include/cuda_bf16.h");
        let env = SearchEnv::new(
            [
                ("BERTFT_CUDA_WHEELS", t.0.join("wheels")),
                ("CUDA_PATH", t.0.join("cuda")),
            ],
            t.0.join("sys"),
        );
        assert_eq!(
            Search::new(&env)
                .find_include_dir(&["cuda_fp16.h", "cuda_bf16.h"])
                .unwrap(),
            t.0.join("cuda/include")
        );
    }

    #[test]
    fn not_found_names_the_file_the_folders_and_the_fix() {
        let t = Tree::new("missing");
        let env = SearchEnv::new([("CUDA_HOME", t.0.join("cuda"))], t.0.join("sys"));
        let e = Search::new(&env)
            .find_lib("NVRTC", "libnvrtc.so.13")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("NVRTC not found: no libnvrtc.so.13 in "),
            "{e}"
        );
        assert!(
            e.contains(&t.0.join("cuda/lib64").display().to_string()),
            "{e}"
        );
        assert!(
            e.contains(&t.0.join("sys/usr/local/cuda/lib64").display().to_string()),
            "{e}"
        );
        assert!(e.contains("BERTFT_CUDA_WHEELS, CUDA_PATH unset"), "{e}");
        assert!(e.contains("tests/run.sh"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn ld_library_path_is_searched_before_system_folders() {
        let t = Tree::new("ldpath");
        t.touch("sys/usr/lib64/libcublasLt.so.13");
        let mine = t.touch("mylibs/libcublasLt.so.13");
        let env = SearchEnv::new(
            [(
                "LD_LIBRARY_PATH",
                std::env::join_paths([t.0.join("none"), t.0.join("mylibs")]).unwrap(),
            )],
            t.0.join("sys"),
        );
        assert_eq!(
            Search::new(&env)
                .find_lib("cuBLASLt", "libcublasLt.so.13")
                .unwrap(),
            mine
        );
    }

    #[test]
    fn opening_a_missing_or_bogus_library_is_an_error() {
        let t = Tree::new("bogus");
        let fake = t.touch("libnvrtc.so.13");
        let e = OpenLib::open("NVRTC", &fake).unwrap_err().to_string();
        assert!(e.starts_with("cannot load NVRTC from "), "{e}");
        assert!(OpenLib::open_soname("libbertft-no-such-library.so.1").is_err());
    }
}
