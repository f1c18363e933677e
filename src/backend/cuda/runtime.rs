//! The CUDA runtime (`libcudart`), for its version only: kernels are compiled by NVRTC and
//! launched through the driver, so nothing else here needs it. It is called directly through
//! libloading (cudarc's `runtime` feature is not built).

use std::ffi::c_int;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

use super::libs::{OpenLib, Search, SearchEnv, CUDA_MAJOR};

/// The runtime library, opened, with its version.
#[derive(Debug)]
pub struct Runtime {
    lib: OpenLib,
    version: (u32, u32),
}

static PROCESS_RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// This process's CUDA runtime, found through its environment on first use.
pub fn runtime() -> Result<&'static Runtime> {
    PROCESS_RUNTIME
        .get_or_init(|| Runtime::load(&SearchEnv::from_process()).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

impl Runtime {
    pub fn load(env: &SearchEnv) -> Result<Self> {
        let path =
            Search::new(env).find_lib("CUDA runtime", &format!("libcudart.so.{CUDA_MAJOR}"))?;
        let lib = OpenLib::open("CUDA runtime", &path)?;
        // SAFETY: cudaRuntimeGetVersion(int*) -> cudaError_t, callable without a GPU.
        let get: unsafe extern "C" fn(*mut c_int) -> c_int =
            unsafe { lib.function("CUDA runtime", "cudaRuntimeGetVersion")? };
        let mut v = 0;
        let status = unsafe { get(&mut v) };
        if status != 0 {
            bail!(
                "cudaRuntimeGetVersion at {} failed: error {status}",
                path.display()
            );
        }
        Ok(Runtime {
            lib,
            version: (v as u32 / 1000, (v as u32 % 1000) / 10),
        })
    }

    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    pub fn path(&self) -> &Path {
        self.lib.path()
    }
}
