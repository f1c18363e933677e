//! cuBLAS and cuBLASLt: found in `libs`' folders, opened by full path and checked before cudarc
//! touches them (see `libs` for why).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::{self as cublas, cublasStatus_t, libraryPropertyType};
use cudarc::cublaslt::sys as cublaslt;

use super::libs::{OpenLib, Search, SearchEnv, CUDA_MAJOR};

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
];

/// cuBLAS and cuBLASLt, opened and checked.
#[derive(Debug)]
pub struct Cublas {
    cublas: OpenLib,
    cublaslt: OpenLib,
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
        cublaslt.require_symbols("cuBLASLt", CUBLASLT_SYMBOLS)?;
        let cublas = OpenLib::open("cuBLAS", &path)?;
        cublas.require_symbols("cuBLAS", CUBLAS_SYMBOLS)?;
        // SAFETY: culib() opens by soname; both are loaded, so neither comes up empty.
        cublaslt.ensure_same_as("cuBLASLt", unsafe { cublaslt::culib() }, "cublasLtCreate")?;
        cublas.ensure_same_as("cuBLAS", unsafe { cublas::culib() }, "cublasCreate_v2")?;

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
        Ok(Cublas {
            cublas,
            cublaslt,
            version,
        })
    }

    /// (major, minor, patch).
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    pub fn path(&self) -> &Path {
        self.cublas.path()
    }

    pub fn lt_path(&self) -> &Path {
        self.cublaslt.path()
    }
}
