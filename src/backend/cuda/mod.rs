//! The CUDA side: finding and opening the CUDA libraries, compiling the kernels of `kernels/`
//! to CUBIN with NVRTC through an on-disk cache, and describing the driver and GPUs; the
//! backend itself, and GPU timing of its ops with CUDA events (`timing`, for the benches).
//!
//! Nothing here is needed to build the crate: cudarc loads every library at run time, and each
//! is first found and checked here (`libs`), so a machine without CUDA gets one-line errors
//! ("NVRTC not found: …", "no CUDA driver found …"), never a panic.

pub mod backend;
pub mod blas;
pub mod cubin;
pub mod driver;
mod graph;
pub mod kernel_cache;
pub mod kernel_params;
pub mod libs;
mod lt;
pub mod nvrtc;
mod readback;
pub mod runtime;
mod timing;

pub use backend::{CudaBackend, CudaIds, CudaTensor};
pub use blas::{cublas, Cublas};
pub use driver::{driver, Driver, Gpu};
pub use graph::GraphStats;
pub use kernel_cache::{
    kernel_files, kernel_headers, CompiledKernels, KernelCache, KernelCompiler,
};
pub use kernel_params::{
    declared_kernels, demangled_params, required_kernels, KernelSignature, ParamKind,
};
pub use libs::{SearchEnv, SearchRoot};
pub use nvrtc::{nvrtc, Arch, CompileError, Nvrtc};
pub use runtime::{runtime, Runtime};
