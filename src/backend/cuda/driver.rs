//! The CUDA driver (`libcuda.so.1`) and the GPUs it sees.
//!
//! The driver is not found through `libs`' folders: it belongs to the GPU driver's installation,
//! which puts it on the dynamic loader's path. It is opened here before cudarc opens it, and
//! checked, for the same reason as the other libraries (see `libs`): cudarc panics when it is
//! missing.

use std::ffi::CStr;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};

use super::libs::OpenLib;
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
    lib: OpenLib,
    version: (u32, u32),
}

static PROCESS_DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// This process's CUDA driver, initialized on first use. The error says why there is none
/// ("no CUDA driver …" or "no CUDA GPU …").
pub fn driver() -> Result<&'static Driver> {
    PROCESS_DRIVER
        .get_or_init(|| Driver::load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

impl Driver {
    fn load() -> Result<Self> {
        let lib = OpenLib::open_soname("libcuda.so.1")
            .map_err(|e| anyhow!("no CUDA driver found ({e:#})"))?;
        lib.require_symbols("the CUDA driver", DRIVER_SYMBOLS)?;
        // SAFETY: culib() opens by soname; libcuda.so.1 is loaded, so it cannot come up empty.
        lib.ensure_same_as("CUDA driver", unsafe { sys::culib() }, "cuInit")?;
        let mut v = 0;
        // SAFETY: an out-parameter; callable before cuInit.
        call("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut v)
        })?;
        let version = (v as u32 / 1000, (v as u32 % 1000) / 10);
        // SAFETY: flags must be 0.
        if let Err(e) = check(unsafe { sys::cuInit(0) }) {
            bail!(
                "no CUDA GPU found (driver for CUDA {}.{} present; cuInit: {e})",
                version.0,
                version.1
            );
        }
        Ok(Driver { lib, version })
    }

    /// The newest CUDA version the driver supports, (major, minor).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    pub fn path(&self) -> &std::path::Path {
        self.lib.path()
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
