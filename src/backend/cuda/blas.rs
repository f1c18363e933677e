//! cuBLAS and cuBLASLt: found in `libs`' folders and opened by full path, then what cudarc
//! opened is checked (its functions and its major version) before anything calls into it (see
//! `libs` for why).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::{self as cublas, cublasStatus_t, libraryPropertyType};
use cudarc::cublaslt::sys as cublaslt;

use super::libs::{check_cudarc_library, OpenLib, Search, SearchEnv, CUDA_MAJOR};

/// The cuBLAS functions this crate calls through cudarc, checked before the first call.
const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasGetProperty",
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasSetMathMode",
    "cublasGemmEx",
    "cublasGemmStridedBatchedEx",
];

/// The cuBLASLt functions this crate calls through cudarc, checked before the first call.
const CUBLASLT_SYMBOLS: &[&str] = &[
    "cublasLtGetProperty",
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmul",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulPreferenceDestroy",
];

/// cuBLAS and cuBLASLt, opened and checked.
#[derive(Debug)]
pub struct Cublas {
    /// Held so that the libraries cudarc uses are never unloaded.
    _opened: [OpenLib; 2],
    /// The files cudarc loaded.
    path: PathBuf,
    lt_path: PathBuf,
    version: (u32, u32, u32),
}

static PROCESS_CUBLAS: OnceLock<std::result::Result<Cublas, String>> = OnceLock::new();

/// This process's cuBLAS, found through its environment on first use.
pub fn cublas() -> Result<&'static Cublas> {
    PROCESS_CUBLAS
        .get_or_init(|| Cublas::load(&SearchEnv::from_process()).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

impl Cublas {
    pub fn load(env: &SearchEnv) -> Result<Self> {
        let search = Search::new(env);
        let lt_path = search.find_lib("cuBLASLt", &format!("libcublasLt.so.{CUDA_MAJOR}"))?;
        let path = search.find_lib("cuBLAS", &format!("libcublas.so.{CUDA_MAJOR}"))?;
        // cuBLASLt first: libcublas needs it by soname, and finds it loaded.
        let cublaslt = OpenLib::open("cuBLASLt", &lt_path)?;
        let cublas = OpenLib::open("cuBLAS", &path)?;
        // SAFETY: culib() opens by soname; both are loaded, so neither comes up empty (and
        // panics).
        let lt_path = check_cudarc_library(
            "cuBLASLt",
            "cublasLt",
            unsafe { cublaslt::culib() },
            CUBLASLT_SYMBOLS,
        )?;
        let path = check_cudarc_library(
            "cuBLAS",
            "cublas",
            unsafe { cublas::culib() },
            CUBLAS_SYMBOLS,
        )?;

        let property = |p: libraryPropertyType| -> Result<u32> {
            let mut v = 0;
            // SAFETY: an out-parameter; needs no GPU and no handle.
            let status = unsafe { cublas::cublasGetProperty(p, &mut v) };
            if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                bail!("cublasGetProperty({p:?}) at {}: {status:?}", path.display());
            }
            Ok(v as u32)
        };
        let version = (
            property(libraryPropertyType::MAJOR_VERSION)?,
            property(libraryPropertyType::MINOR_VERSION)?,
            property(libraryPropertyType::PATCH_LEVEL)?,
        );
        if version.0 != CUDA_MAJOR {
            bail!(
                "cuBLAS at {} is version {}.{}, these bindings need {CUDA_MAJOR}.x (another cuBLAS \
                 is first on the dynamic loader's path: point CUDA_HOME at it or remove it)",
                path.display(),
                version.0,
                version.1
            );
        }
        Ok(Cublas {
            _opened: [cublaslt, cublas],
            path,
            lt_path,
            version,
        })
    }

    /// (major, minor, patch).
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lt_path(&self) -> &Path {
        &self.lt_path
    }
}
