//! The CUDA driver (`libcuda.so.1`) and the GPUs it sees.
//!
//! The driver is not found through `libs`' folders: it belongs to the GPU driver's installation,
//! which puts it on the dynamic loader's path. It is opened here first, so that a machine
//! without one gets an error rather than cudarc's panic, and then what cudarc opened is checked
//! for every function called through it (see `libs`).

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};

use super::libs::{check_cudarc_library, OpenLib};
use super::nvrtc::Arch;

/// The driver functions called through cudarc, checked before the first call.
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuGetErrorString",
];

/// One GPU, as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100 or H200.
    pub compute_capability: (u32, u32),
    pub total_memory: usize,
    pub multiprocessors: u32,
}

impl Gpu {
    /// The architecture its kernels are compiled for.
    pub fn arch(&self) -> Arch {
        Arch::from_compute_capability(self.compute_capability.0, self.compute_capability.1)
    }
}

/// The CUDA driver, opened and initialized.
#[derive(Debug)]
pub struct Driver {
    /// Held so the library cudarc uses is never unloaded.
    _lib: OpenLib,
    /// The file cudarc loaded.
    path: PathBuf,
    version: (u32, u32),
}

static PROCESS_DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// This process's CUDA driver, initialized on first use. The error ("no CUDA driver/GPU found:
/// …") says why there is none.
pub fn driver() -> Result<&'static Driver> {
    PROCESS_DRIVER
        .get_or_init(|| Driver::load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

impl Driver {
    fn load() -> Result<Self> {
        let lib = OpenLib::open_soname("libcuda.so.1")
            .map_err(|e| anyhow!("no CUDA driver/GPU found: no driver ({e:#})"))?;
        // SAFETY: culib() opens by soname, trying libcuda.so.1 among others; it is loaded, so
        // culib() cannot come up empty (and panic).
        let path = check_cudarc_library(
            "the CUDA driver",
            "cuda",
            unsafe { sys::culib() },
            DRIVER_SYMBOLS,
        )?;
        let mut v = 0;
        // SAFETY: an out-parameter; callable before cuInit.
        call("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut v)
        })?;
        let version = (v as u32 / 1000, (v as u32 % 1000) / 10);
        // SAFETY: flags must be 0.
        if let Err(e) = check(unsafe { sys::cuInit(0) }) {
            bail!(
                "no CUDA driver/GPU found: the driver (for CUDA {}.{}) sees no GPU (cuInit: {e})",
                version.0,
                version.1
            );
        }
        Ok(Driver {
            _lib: lib,
            path,
            version,
        })
    }

    /// The newest CUDA version the driver supports, (major, minor).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every GPU the driver sees, in ordinal order.
    pub fn gpus(&self) -> Result<Vec<Gpu>> {
        let mut count = 0;
        // SAFETY: cuInit succeeded (a Driver exists); out-parameters throughout.
        call("cuDeviceGetCount", unsafe {
            sys::cuDeviceGetCount(&mut count)
        })?;
        (0..count)
            .map(|ordinal| {
                let mut dev = 0;
                call("cuDeviceGet", unsafe {
                    sys::cuDeviceGet(&mut dev, ordinal)
                })?;
                let mut name = [0u8; 256];
                call("cuDeviceGetName", unsafe {
                    sys::cuDeviceGetName(name.as_mut_ptr().cast(), name.len() as i32, dev)
                })?;
                let mut total_memory = 0usize;
                call("cuDeviceTotalMem", unsafe {
                    sys::cuDeviceTotalMem_v2(&mut total_memory, dev)
                })?;
                let attr = |a: CUdevice_attribute| -> Result<u32> {
                    let mut v = 0;
                    call(&format!("cuDeviceGetAttribute({a:?})"), unsafe {
                        sys::cuDeviceGetAttribute(&mut v, a, dev)
                    })?;
                    Ok(v as u32)
                };
                Ok(Gpu {
                    ordinal: ordinal as usize,
                    name: CStr::from_bytes_until_nul(&name)
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    compute_capability: (
                        attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                        attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                    ),
                    total_memory,
                    multiprocessors: attr(
                        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    )?,
                })
            })
            .collect()
    }
}

/// The driver's result as a Result, in the driver's own words.
fn check(r: CUresult) -> std::result::Result<(), String> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut msg: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver returns a static string, or an error for an unknown code.
    if unsafe { sys::cuGetErrorString(r, &mut msg) } == CUresult::CUDA_SUCCESS && !msg.is_null() {
        let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
        return Err(format!("{r:?}: {text}"));
    }
    Err(format!("{r:?}"))
}

/// [`check`] for calls whose failure ends the operation: an error naming the call.
fn call(what: &str, r: CUresult) -> Result<()> {
    check(r).map_err(|e| anyhow!("{what}: {e}"))
}
