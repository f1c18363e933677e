//! `CudaBackend`: the [`Backend`] on one GPU, with the kernels of `kernels/` (compiled to
//! CUBIN by NVRTC through the on-disk cache) and cuBLAS for the dense layers.
//!
//! # Memory, views and pointers
//! A [`CudaTensor`] is a cheap handle: an `Arc` of one device allocation (a `CudaSlice<f32>` and
//! its base address), an element offset, a length and the element type (fp32, or 16-bit for the
//! activations `zeros_in_matmul_format` makes). Views share the allocation; a kernel is given
//! the raw address `base + size·offset` (`u64`); `CudaTensor::device_ptr`, which the fp32-only
//! ops use, refuses a 16-bit tensor. cudarc's per-slice event tracking is turned
//! off: everything runs in order on the backend's single stream, so no cross-stream
//! synchronization is needed, and the raw pointers bypass cudarc's borrow rules anyway. The
//! trait's aliasing rule is what makes this sound: an op's outputs never overlap its inputs or
//! each other (the kernels take `__restrict__` pointers); it is the caller's contract, as on the
//! CPU backend. Allocations are freed stream-ordered (`cuMemFreeAsync`) when the last handle
//! drops, so a buffer dropped while a kernel still reads it stays valid for that kernel.
//!
//! # Dense layers (cuBLAS, row-major through column-major)
//! A row-major `[r, c]` matrix is, as cuBLAS sees the same memory, the column-major `[c, r]`
//! matrix (its transpose) with leading dimension `c`. So each row-major product `C = A·B` is
//! computed as the column-major `Cᵀ = Bᵀ·Aᵀ`, i.e. with the operands swapped:
//! - forward `out[rows,n] = x·wᵀ`: `outᵀ(n×rows) = op(w)·xᵀ` with `w` (col-major `k×n`) transposed:
//!   `gemm(T, N, m=n, n=rows, k, A=w lda=k, B=x ldb=k, C=out ldc=n)`, with the bias added by
//!   cuBLASLt's epilogue in the same call (`lt`); where that is not available, `out` is first set
//!   to the bias by a rank-1 product `outᵀ = bias(n×1)·ones(1×rows)` (beta 0), then beta 1.
//! - `dx[rows,k] (=|+=) dout·w`: `dxᵀ(k×rows) = wᵀ(k×n)·doutᵀ(n×rows)`:
//!   `gemm(N, N, m=k, n=rows, k=n, A=w lda=k, B=dout ldb=n, C=dx ldc=k)`, beta 0 or 1.
//! - `dw[n,k] += doutᵀ·x`: `dwᵀ(k×n) = xᵀ(k×rows)·dout(rows×n)`:
//!   `gemm(N, T, m=k, n=n, k=rows, A=x lda=k, B=dout ldb=n, C=dw ldc=k)`, beta 1.
//! - `dbias[n] += Σ_rows dout`: a column sum (`bias_grad.cu`) in the same pass over `dout` as
//!   its 16-bit cast for the two GEMMs above.
//!
//! All other GEMMs are `cublasGemmEx` with fp32 output and `CUBLAS_COMPUTE_32F` accumulation. What the
//! operands `x`, `w` and `dout` are read as follows [`MatmulPrecision`]:
//! - `F32`: fp32 operands, `CUBLAS_COMPUTE_32F` under `CUBLAS_DEFAULT_MATH` (no TF32), so results
//!   match the CPU up to fp32 summation order.
//! - `Tf32`: fp32 operands, `CUBLAS_COMPUTE_32F_FAST_TF32` (tensor cores read 10-bit mantissas).
//! - `F16`/`Bf16`: each fp32 operand is cast (`cast.cu`, round to nearest even) into a 16-bit
//!   copy made for the call (the weights once per region, `WeightCopies`; `dout`'s copy by the
//!   bias-gradient kernel), and the GEMM reads `CUDA_R_16F`/`CUDA_R_16BF` with fp32 accumulation
//!   on the tensor cores. An activation stored 16-bit ([`Dtype`]: the feed-forward
//!   pre-activation and activation, the LayerNorm outputs' copies that LayerNorm writes beside
//!   its fp32 output, and qkv and the attention output for the tensor-core attention) is read
//!   as it is, and
//!   a GEMM whose output is one writes it 16-bit (cuBLASLt's D type, the fp32 bias added before
//!   the one rounding; where cuBLASLt refuses that, the same GEMM into fp32 scratch, or the
//!   two-GEMM path, then a cast). The master weights, the other activations, the biases, the
//!   gradients and the other ops stay fp32 (the activation and attention kernels read and write
//!   the 16-bit tensors they are given, LayerNorm writes the 16-bit copy it is given). The CPU
//!   backend rounds the same operands and outputs the same way, so the two differ only by
//!   summation order.
//!
//! # Scratch
//! Per-call scratch (LayerNorm's dgamma/dbeta partials, the bias gradients' partials, Σx²
//! partials, attention's `delta`, the AdamW segment table, the 16-bit GEMM operand copies, the
//! fp32 output of a GEMM into a 16-bit tensor when cuBLASLt cannot write it, a 16-bit copy of an
//! fp32 qkv for the tensor-core attention) is allocated stream-ordered per call
//! (`cuMemAllocAsync`) and freed stream-ordered when dropped. Those allocations come from the
//! device's default memory pool, whose release threshold is raised to "never" when the backend
//! opens: memory a step frees stays in the pool and the next step's identical requests are served
//! from it, with no driver allocation after the first step of each batch shape (by default the
//! pool returns everything to the driver at each synchronization). The pool's high-water mark of
//! memory in use is the backend's peak memory. An allocation that fails for lack of memory is an
//! [`OutOfMemory`] error, which the trainer words in terms of the batch. The `ones` vector of the
//! fallback bias GEMM is kept and grown on demand; the `SeqLayout` arrays (starts, rows, valid) are uploaded once per distinct
//! layout and kept in a small cache (forward and backward of every layer share one layout).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::sys as blas;
use cudarc::cublaslt::sys::{cublasComputeType_t as LtComputeType, cudaDataType as LtDataType};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{result as dres, sys as dsys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use cudarc::nvrtc::Ptx;

use super::graph::{
    self, Arg, Entry, ExecGraph, GraphCache, GraphStats, Launch, Mismatch, Replay, Tape,
};
use super::kernel_params::*;
use super::libs::check_cudarc_library;
use super::lt::{self, BiasGemm, Lt};
use super::readback::PendingDownload;
use super::{cublas, driver, kernel_files, nvrtc, KernelCache, KernelCompiler};
use crate::backend::{
    attention_rounding, Activation, AdamWStep, AdamWTensor, AttentionDims, Backend, BranchGrad,
    Dropout, Dtype, MatmulPrecision, OutOfMemory, ResidualAdd, SeqLayout, IGNORE_LABEL,
};

/// The driver functions cudarc calls for this backend (cudarc panics on a missing one, so they
/// are checked first).
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemAllocAsync",
    "cuDeviceGetMemPool",
    "cuMemPoolSetAttribute",
    "cuMemPoolGetAttribute",
    "cuMemFreeAsync",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
    "cuGetErrorString",
    "cuGetErrorName",
];

/// cuBLAS's workspace (see `CudaBackend::new`).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Warps per block of `layernorm_backward_f32` (block 128), fewer for very wide rows.
const LN_BWD_WARPS: u32 = 4;

/// One device allocation with its base address.
struct Buffer<T: 'static> {
    /// Owns the allocation (freed stream-ordered on drop); `None` for the allocation of a
    /// replayed CUDA graph, which the graph's own free node releases.
    _slice: Option<CudaSlice<T>>,
    ptr: u64,
    /// For an allocation made while capturing a graph: counts it among the region's live ones
    /// (dropped after the slice, so the free is captured first).
    _captured: Option<CapturedAlloc>,
}

impl<T> Buffer<T> {
    fn new(slice: CudaSlice<T>, stream: &CudaStream) -> Self {
        // With event tracking off, device_ptr only reads the address.
        let ptr = slice.device_ptr(stream).0;
        Buffer {
            _slice: Some(slice),
            ptr,
            _captured: None,
        }
    }
}

impl<T: 'static> Drop for Buffer<T> {
    fn drop(&mut self) {
        // An allocation made before a captured or replayed region whose last handle goes inside
        // it: its stream-ordered free would be a graph node for memory the graph does not own
        // (capture), or queued before the graph that may still read it (replay). It waits for
        // the region's graph instead (`deferring_frees`). Allocations made while capturing are
        // the graph's own (`_captured`), and those of a replay have no slice.
        let Some(slice) = self._slice.take() else {
            return;
        };
        if self._captured.is_some() {
            return drop(slice);
        }
        // (`try_with`: in the thread's teardown there is no region; the closure is dropped
        // unrun, and the slice it holds is freed now.)
        let kept = DEFERRED_FREES
            .try_with(|d| match d.borrow_mut().as_mut() {
                Some(deferred) => {
                    deferred.push(Box::new(slice));
                    None
                }
                None => Some(slice),
            })
            .unwrap_or(None);
        drop(kept);
    }
}

thread_local! {
    /// While a region is captured or replayed on this thread: the allocations made before it
    /// whose last handle went inside it (see `Buffer`'s Drop). Per thread, since a region runs
    /// on one thread and the tensors it drops are dropped there (batches cross threads only as
    /// host data, `train::prefetch`).
    static DEFERRED_FREES: RefCell<Option<Vec<Box<dyn Any>>>> = const { RefCell::new(None) };
}

/// Frees that wait until the region's graph has been queued: dropping this frees them, stream
/// ordered after everything queued before.
struct DeferredFrees(#[allow(dead_code)] Vec<Box<dyn Any>>);

/// Runs a captured or replayed `region`, deferring the frees of allocations made before it
/// (see `Buffer`'s Drop); the caller drops what comes back once the graph is queued, or before
/// it runs the region again eagerly.
fn deferring_frees(region: &mut dyn FnMut() -> Result<()>) -> (Result<()>, DeferredFrees) {
    /// On a panic in the region, what was deferred is leaked rather than freed: the graph may
    /// still be capturing, or queued work may still read it.
    struct OnUnwind;
    impl Drop for OnUnwind {
        fn drop(&mut self) {
            if let Some(deferred) = DEFERRED_FREES.with(|d| d.borrow_mut().take()) {
                std::mem::forget(deferred);
            }
        }
    }
    let outer = DEFERRED_FREES.with(|d| d.borrow_mut().replace(Vec::new()));
    debug_assert!(outer.is_none(), "regions do not nest");
    // Were one nested, the outer region's frees would still wait for its graph: leak them.
    std::mem::forget(outer);
    let unwinding = OnUnwind;
    let ran = region();
    std::mem::forget(unwinding);
    let deferred = DEFERRED_FREES.with(|d| d.borrow_mut().take());
    (ran, DeferredFrees(deferred.unwrap_or_default()))
}

/// One live allocation of a region being captured: a capture is only kept when the region
/// freed everything it allocated (an allocation that outlived it would be the graph's memory).
struct CapturedAlloc(Arc<AtomicUsize>);

impl CapturedAlloc {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        CapturedAlloc(live.clone())
    }
}

impl Drop for CapturedAlloc {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the backend does with the ops it is given (see `graph`).
enum GraphMode {
    /// Queue them.
    Eager,
    /// Queue them on the capturing stream and write them on the tape.
    Capture {
        tape: Tape,
        live: Arc<AtomicUsize>,
        /// Why the capture cannot be kept, once something went wrong outside the region's view.
        broken: Option<String>,
    },
    /// Match them against a captured graph's tape, queueing nothing.
    Replay(Replay),
}

/// Sets the backend's graph mode for the length of a region and puts `Eager` back when
/// dropped, ending the stream's capture too if the region panicked mid-capture (so that the
/// backend stays usable after a caught panic).
struct ModeGuard<'a> {
    backend: &'a CudaBackend,
    capturing: bool,
    done: bool,
}

impl<'a> ModeGuard<'a> {
    fn set(backend: &'a CudaBackend, mode: GraphMode, capturing: bool) -> Self {
        backend.set_graph_mode(mode);
        ModeGuard {
            backend,
            capturing,
            done: false,
        }
    }

    /// The mode the region left, and `Eager` back (the capture, if any, still to be ended).
    fn finish(mut self) -> GraphMode {
        self.done = true;
        self.backend.set_graph_mode(GraphMode::Eager)
    }
}

impl Drop for ModeGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.backend.set_graph_mode(GraphMode::Eager);
            if self.capturing {
                let _ = graph::end_capture(self.backend.stream.cu_stream(), false);
            }
        }
    }
}

/// The CUDA graphs of the training step (present when turned on).
struct Graphs {
    mode: GraphMode,
    cache: GraphCache<ExecGraph>,
    stats: GraphStats,
}

/// A tensor on the GPU, or a view into one (see the module header): fp32, or 16-bit where
/// made by `zeros_in_matmul_format` ([`Dtype`]).
#[derive(Clone)]
pub struct CudaTensor {
    /// The allocation, counted in 4-byte units whatever the type (a 16-bit tensor of `n`
    /// elements takes `⌈n/2⌉` of them).
    buf: Arc<Buffer<f32>>,
    /// In elements of `dtype`.
    offset: usize,
    len: usize,
    dtype: Dtype,
}

impl CudaTensor {
    /// The device address of the first element of an fp32 tensor: what every op that reads and
    /// writes fp32 only passes its kernel.
    ///
    /// # Panics
    /// On a 16-bit tensor (a bug in the caller: the model hands 16-bit tensors only to the ops
    /// that take them, which the CPU backend's tests check; see [`Dtype`]). Those ops use
    /// [`CudaTensor::any_ptr`].
    pub fn device_ptr(&self) -> u64 {
        assert!(
            self.dtype == Dtype::F32,
            "a {} tensor was given to a CUDA op that reads and writes fp32 only",
            self.dtype.name()
        );
        self.any_ptr()
    }
    /// The device address of the first element, whatever the type.
    pub fn any_ptr(&self) -> u64 {
        self.buf.ptr + (self.offset * self.dtype.size()) as u64
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `u32` indices on the GPU, with the host copy they were uploaded from (for range checks the
/// kernels do not make).
#[derive(Clone)]
pub struct CudaIds {
    buf: Arc<Buffer<u32>>,
    host: Arc<Vec<u32>>,
}

impl CudaIds {
    pub fn device_ptr(&self) -> u64 {
        self.buf.ptr
    }
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    pub fn host(&self) -> &[u32] {
        &self.host
    }
}

/// The segment table entry of `adamw_update` (optim.cu's `AdamWSegment`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamWSegment {
    offset: u64,
    length: u64,
    weight_decay: f64,
}

/// A GEMM operand: its address and data type, and the 16-bit copy it may live in.
struct GemmOperand {
    ptr: u64,
    dtype: blas::cudaDataType,
    _copy: Option<Arc<Buffer<u16>>>,
}

impl GemmOperand {
    fn fp32(ptr: u64) -> Self {
        GemmOperand {
            ptr,
            dtype: blas::cudaDataType::CUDA_R_32F,
            _copy: None,
        }
    }
}

/// A cuBLAS handle, destroyed on drop.
struct BlasHandle(blas::cublasHandle_t);

// SAFETY: the handle is only used under the backend's Mutex, one thread at a time.
unsafe impl Send for BlasHandle {}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate_v2, destroyed once.
        unsafe {
            blas::cublasDestroy_v2(self.0);
        }
    }
}

/// The 16-bit copy of the parameters the dense layers' GEMMs read within a region
/// ([`Backend::refresh_weight_copies`]).
struct WeightCopies {
    /// The parameters' allocation (by identity: a weak handle, so that the model's memory is
    /// not kept alive by this), and the flat tensor's place in it.
    params: Weak<Buffer<f32>>,
    offset: usize,
    len: usize,
    /// `len` elements, fp16 or bf16 as the backend's precision.
    copy: Arc<Buffer<u16>>,
    /// Cast in the region now running; false outside regions.
    fresh: bool,
}

impl WeightCopies {
    fn is_for(&self, params: &CudaTensor) -> bool {
        self.params.as_ptr() == Arc::as_ptr(&params.buf)
            && (self.offset, self.len) == (params.offset, params.len)
    }

    /// Where `t`'s 16-bit copy lies, if `t` is a view of the parameters and the copy is fresh.
    fn copy_of(&self, t: &CudaTensor) -> Option<u64> {
        let inside = self.params.as_ptr() == Arc::as_ptr(&t.buf)
            && t.dtype == Dtype::F32
            && t.offset >= self.offset
            && t.offset + t.len <= self.offset + self.len;
        (self.fresh && inside).then(|| self.copy.ptr + 2 * (t.offset - self.offset) as u64)
    }
}

/// Marks a [`Backend::run_region`] as running; on leaving it, also by a panic, the weights'
/// copy goes stale: it is the region's, and the parameters change between regions (AdamW).
struct RegionGuard<'a>(&'a CudaBackend);

impl<'a> RegionGuard<'a> {
    fn enter(backend: &'a CudaBackend) -> Self {
        backend.in_region.store(true, Ordering::Relaxed);
        RegionGuard(backend)
    }
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        self.0.in_region.store(false, Ordering::Relaxed);
        let mut copies = match self.0.weight_copies.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = copies.as_mut() {
            c.fresh = false;
        }
    }
}

/// An AdamW segment table (optim.cu's layout, as u64 words) and its device copy.
type AdamWTable = (Vec<u64>, Arc<Buffer<u64>>);

/// The uploaded arrays of one [`SeqLayout`]: starts | rows | valid, `batch` u32 each.
struct LayoutBuf {
    layout: SeqLayout,
    buf: Arc<Buffer<u32>>,
}

impl LayoutBuf {
    fn starts(&self) -> u64 {
        self.buf.ptr
    }
    fn rows(&self) -> u64 {
        self.buf.ptr + 4 * self.layout.batch() as u64
    }
    fn valid(&self) -> u64 {
        self.buf.ptr + 8 * self.layout.batch() as u64
    }
}

/// Layouts kept uploaded: those of the batches being prepared ahead and those of the step on
/// the device (a CUDA graph region must find its layouts here, uploaded before it).
const LAYOUT_CACHE: usize = 64;

/// The fp32 CUDA backend on one GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Kept alive for the functions' sake.
    _modules: Vec<Arc<CudaModule>>,
    functions: HashMap<String, CudaFunction>,
    blas: Mutex<BlasHandle>,
    ones: Mutex<Option<CudaTensor>>,
    layouts: Mutex<Vec<Arc<LayoutBuf>>>,
    /// AdamW's segment tables (optim.cu's layout), the same every step of a run: uploaded once,
    /// not per step from pageable memory (a copy that can make the host wait for the queue).
    adamw_tables: Mutex<Vec<AdamWTable>>,
    /// Pad batches to their buckets also without graphs ([`CudaBackend::with_bucket_padding`]).
    bucket_padding: bool,
    weight_copies: Mutex<Option<WeightCopies>>,
    /// A [`Backend::run_region`] is running (weight copies are fresh only inside one).
    in_region: AtomicBool,
    name: String,
    /// What the dense layers' GEMMs read their operands as.
    precision: MatmulPrecision,
    sms: u32,
    /// Max dynamic shared memory per block (opt-in).
    max_smem_optin: u32,
    /// sm_80 or newer: the tensor-core attention kernels run (they trap on older GPUs).
    tensor_core_attention: bool,
    /// The pool the stream's allocations come from (`None`: synchronous allocations).
    pool: Option<MemPool>,
    /// Page-locked buffers for [`PendingDownload`]s, reused (allocating one can synchronize).
    pinned: Mutex<Vec<PinnedHostSlice<f32>>>,
    /// CUDA graphs of the training step (`None`: off). Declared before the buffers below, so
    /// that the graphs are destroyed while those still hold the context.
    graphs: Option<Mutex<Graphs>>,
    /// cuBLASLt for the dense layers' forward with the bias in the epilogue, and its
    /// workspace (`None`: turned off by `BERTFT_CUBLASLT=0`, or unavailable).
    lt: Option<(Lt, Arc<Buffer<u8>>)>,
    /// cuBLAS's workspace, set once so that a captured GEMM allocates nothing.
    blas_workspace: Option<Arc<Buffer<u8>>>,
}

/// Waits for the queue before the fields go: they drop in declaration order, so the modules
/// would be unloaded, and the graphs and buffers freed, while queued work still uses them (the
/// host runs a step ahead of the device).
impl Drop for CudaBackend {
    fn drop(&mut self) {
        // An error recorded by an earlier free would fail a bind first: clear it, then wait
        // (the stream's synchronize binds the context itself).
        let _ = self.ctx.check_err();
        let _ = self.stream.synchronize();
    }
}

fn grid_1d(n: usize, per_thread: usize, block: u32, cap: u32) -> u32 {
    let blocks = n.div_ceil(per_thread).div_ceil(block as usize);
    blocks.clamp(1, cap as usize) as u32
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit the kernels' 32-bit sizes"))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} is too large for cuBLAS"))
}

fn blas_check(what: &str, s: blas::cublasStatus_t) -> Result<()> {
    match s {
        blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        blas::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => Err(OutOfMemory {
            what: format!("{what}: cuBLAS workspace"),
        }
        .into()),
        _ => bail!("{what}: {s:?}"),
    }
}

/// The device's current memory pool (where `cuMemAllocAsync` allocates: the default pool, as
/// nothing here sets another), set to keep what is freed (see the module header), its
/// high-water mark reset so that it counts from this backend's opening; `None` on a GPU without
/// memory pools (cudarc then allocates synchronously).
fn keep_freed_memory_pooled(ctx: &CudaContext) -> Result<Option<MemPool>> {
    let mut supported = 0i32;
    // SAFETY: out-parameters of plain queries on a valid device.
    unsafe {
        dsys::cuDeviceGetAttribute(
            &mut supported,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
            ctx.cu_device(),
        )
        .result()
        .map_err(|e| anyhow!("cuDeviceGetAttribute(MEMORY_POOLS_SUPPORTED): {e}"))?;
    }
    if supported == 0 {
        return Ok(None);
    }
    let mut pool: dsys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: an out-parameter of a query on a valid device.
    unsafe { dsys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| anyhow!("cuDeviceGetMemPool: {e}"))?;
    use dsys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as RELEASE_THRESHOLD,
        CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED_MEM_HIGH,
    };
    set_pool_attribute(pool, RELEASE_THRESHOLD, u64::MAX)?;
    set_pool_attribute(pool, USED_MEM_HIGH, 0)?;
    Ok(Some(MemPool(pool)))
}

/// Sets one of a pool's `cuuint64_t` attributes (the release threshold, the high-water marks).
fn set_pool_attribute(
    pool: dsys::CUmemoryPool,
    attribute: dsys::CUmemPool_attribute,
    mut value: u64,
) -> Result<()> {
    // SAFETY: a valid pool; the attributes set here take a u64 (cuuint64_t).
    unsafe { dsys::cuMemPoolSetAttribute(pool, attribute, &mut value as *mut u64 as *mut c_void) }
        .result()
        .map_err(|e| anyhow!("cuMemPoolSetAttribute({attribute:?}): {e}"))
}

/// A device's default memory pool (owned by the driver: nothing to release).
struct MemPool(dsys::CUmemoryPool);
// SAFETY: a pool handle is a process-wide driver object, usable from any thread.
unsafe impl Send for MemPool {}
unsafe impl Sync for MemPool {}

impl CudaBackend {
    /// Opens GPU `device_index`: checks the driver and cuBLAS (one-line errors, no panics),
    /// compiles (or reads from the kernel cache) every kernel file for the GPU's architecture,
    /// loads them and creates the stream and cuBLAS handle.
    pub fn new(device_index: usize) -> Result<Self> {
        let drv = driver()?;
        let gpus = drv.gpus()?;
        if gpus.is_empty() {
            bail!("no CUDA driver/GPU found: the driver sees no GPU");
        }
        let gpu = gpus.get(device_index).ok_or_else(|| {
            anyhow!(
                "no GPU {device_index}: the driver sees {} (0..{})",
                gpus.len(),
                gpus.len()
            )
        })?;
        // SAFETY: the driver is loaded (driver() succeeded), so culib() does not come up empty.
        check_cudarc_library(
            "the CUDA driver",
            "cuda",
            unsafe { dsys::culib() },
            DRIVER_SYMBOLS,
        )?;
        let cublas_lib = cublas()?;
        let nvrtc = nvrtc().map_err(|e| anyhow!("cannot compile the kernels: {e:#}"))?;
        let arch = gpu.arch();
        if !nvrtc.supported_archs().contains(&arch.number) {
            bail!(
                "NVRTC {}.{} does not compile for {arch} (GPU {device_index}: {})",
                nvrtc.version().0,
                nvrtc.version().1,
                gpu.name
            );
        }
        let compiler = KernelCompiler::new(nvrtc, KernelCache::open_default()?);
        let mut compiled = Vec::new();
        for (file, _) in kernel_files() {
            compiled.push(compiler.compile_kernel_file(file, arch)?);
        }

        let ctx = CudaContext::new(device_index)
            .map_err(|e| anyhow!("cannot open GPU {device_index}: {e}"))?;
        // SAFETY: everything runs on one stream, in order (see the module header).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("cannot create a CUDA stream: {e}"))?;
        let pool = keep_freed_memory_pooled(&ctx)?;

        let mut modules = Vec::new();
        let mut functions = HashMap::new();
        for k in compiled {
            let module = ctx
                .load_module(Ptx::from_binary(k.cubin))
                .map_err(|e| anyhow!("cannot load the CUBIN of {} ({}): {e}", k.file, arch))?;
            for name in &k.kernels {
                let f = module
                    .load_function(name)
                    .map_err(|e| anyhow!("{}: no kernel {name}: {e}", k.file))?;
                functions.insert(name.clone(), f);
            }
            modules.push(module);
        }
        for name in required_kernels() {
            ensure!(
                functions.contains_key(name),
                "the compiled kernels lack {name} (kernels/ out of date?)"
            );
        }
        let attr = |a: CUdevice_attribute| -> Result<u32> {
            Ok(ctx
                .attribute(a)
                .map_err(|e| anyhow!("cuDeviceGetAttribute({a:?}): {e}"))? as u32)
        };
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1);
        let max_smem_optin =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                .max(48 * 1024);
        // layernorm_backward's dynamic shared memory may exceed the default 48 KiB.
        functions["layernorm_backward_f32"]
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                max_smem_optin as i32,
            )
            .map_err(|e| anyhow!("cuFuncSetAttribute(layernorm_backward_f32): {e}"))?;

        let mut handle: blas::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: out-parameter; the context is current (bound by new_stream).
        blas_check("cublasCreate", unsafe {
            blas::cublasCreate_v2(&mut handle)
        })?;
        let handle = BlasHandle(handle);
        // SAFETY: a live handle and stream.
        blas_check("cublasSetStream", unsafe {
            blas::cublasSetStream_v2(handle.0, stream.cu_stream() as _)
        })?;
        // No TF32: fp32 GEMMs match the CPU to fp32 rounding.
        blas_check("cublasSetMathMode", unsafe {
            blas::cublasSetMathMode(handle.0, blas::cublasMath_t::CUBLAS_DEFAULT_MATH)
        })?;

        let v = cublas_lib.version();
        let name = format!(
            "cuda:{device_index} ({}, {arch}, {} SMs, cuBLAS {}.{}.{})",
            gpu.name, sms, v.0, v.1, v.2
        );
        let mut backend = CudaBackend {
            ctx,
            stream,
            _modules: modules,
            functions,
            blas: Mutex::new(handle),
            ones: Mutex::new(None),
            layouts: Mutex::new(Vec::new()),
            adamw_tables: Mutex::new(Vec::new()),
            bucket_padding: false,
            weight_copies: Mutex::new(None),
            in_region: AtomicBool::new(false),
            name,
            precision: MatmulPrecision::F32,
            sms,
            max_smem_optin,
            tensor_core_attention: arch.number >= 80,
            pool,
            pinned: Mutex::new(Vec::new()),
            graphs: None,
            lt: None,
            blas_workspace: None,
        };
        // cuBLAS's workspace, given rather than left to cuBLAS: a GEMM captured into a CUDA
        // graph must not allocate. 32 MiB, what cuBLAS itself takes on Hopper.
        let workspace = backend.alloc_raw::<u8>(BLAS_WORKSPACE_BYTES)?;
        {
            let handle = backend.blas.lock().unwrap();
            // SAFETY: a live handle; the workspace outlives it (dropped with the backend, after
            // a synchronization in the handle's destruction).
            blas_check("cublasSetWorkspace", unsafe {
                blas::cublasSetWorkspace_v2(
                    handle.0,
                    workspace.ptr as *mut c_void,
                    BLAS_WORKSPACE_BYTES,
                )
            })?;
        }
        backend.blas_workspace = Some(workspace);
        // BERTFT_CUBLASLT=0 keeps the two-GEMM bias path (for comparing the two on a GPU).
        if std::env::var_os("BERTFT_CUBLASLT").is_none_or(|v| v != "0") {
            let workspace = backend.alloc_raw::<u8>(lt::WORKSPACE_BYTES)?;
            match Lt::new(workspace.ptr) {
                Ok(lt) => backend.lt = Some((lt, workspace)),
                // Only a slower path: the bias then takes a GEMM of its own.
                Err(e) => eprintln!("notice: cuBLASLt unavailable ({e:#}); biases added by cuBLAS"),
            }
        }
        Ok(backend)
    }

    /// A page-locked buffer of at least `len` f32, from the pool or newly allocated.
    pub(super) fn take_pinned(&self, len: usize) -> Result<PinnedHostSlice<f32>> {
        let mut pool = self.pinned.lock().unwrap();
        if let Some(i) = pool.iter().position(|b| b.len() >= len) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        self.bind()?;
        // SAFETY: the buffer is written by a device-to-host copy before it is read.
        unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len.max(64), 0) }
            .map_err(|e| anyhow!("cannot allocate {len} page-locked floats: {e}"))
    }

    pub(super) fn return_pinned(&self, buf: PinnedHostSlice<f32>) {
        self.pinned.lock().unwrap().push(buf);
    }

    /// The most device memory the stream-ordered allocations have held at once since this
    /// backend opened (the pool's `USED_MEM_HIGH`): parameters, optimizer state, activations,
    /// scratch, and the cuBLAS and cuBLASLt workspaces (32 MiB each; PyTorch's
    /// `max_memory_allocated` counts cuBLAS's workspaces too); not the context or the loaded
    /// modules. `None` without memory pools.
    pub fn peak_pool_bytes(&self) -> Result<Option<u64>> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let mut high = 0u64;
        // SAFETY: the attribute is a u64 (cuuint64_t) out-parameter.
        unsafe {
            dsys::cuMemPoolGetAttribute(
                pool.0,
                dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut high as *mut u64 as *mut c_void,
            )
            .result()
            .map_err(|e| anyhow!("cuMemPoolGetAttribute(USED_MEM_HIGH): {e}"))?;
        }
        Ok(Some(high))
    }

    /// The most memory the CUDA graphs' allocations have held at once (0 with graphs off). Added
    /// to the pool's peak, it bounds the peak from above: the two need not peak together.
    fn graph_memory_high(&self) -> u64 {
        if self.graphs.is_none() {
            return 0;
        }
        let mut high = 0u64;
        // SAFETY: the attribute is a u64 out-parameter.
        let read = unsafe {
            dsys::cuDeviceGetGraphMemAttribute(
                self.ctx.cu_device(),
                dsys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                &mut high as *mut u64 as *mut c_void,
            )
        };
        if read == dsys::CUresult::CUDA_SUCCESS {
            high
        } else {
            0
        }
    }

    /// The same backend with its dense layers' GEMMs reading operands as `precision`.
    pub fn with_matmul_precision(mut self, precision: MatmulPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// This backend, with batches padded to their sequence and row buckets by the trainer and
    /// evaluation whether or not steps run as CUDA graphs: the padded path alone, to tell a
    /// padding problem from a graph problem.
    pub fn with_bucket_padding(mut self) -> Self {
        self.bucket_padding = true;
        self
    }

    /// The same backend recording the training step as CUDA graphs (see `graph`) when `on`.
    /// Needs stream-ordered allocation and a driver with the graph functions; without them it
    /// says so once and runs eagerly.
    pub fn with_cuda_graphs(mut self, on: bool) -> Self {
        if !on {
            self.graphs = None;
            return self;
        }
        // SAFETY: the driver is loaded (the backend is open).
        let symbols = check_cudarc_library(
            "the CUDA driver",
            "cuda",
            unsafe { dsys::culib() },
            graph::GRAPH_SYMBOLS,
        );
        match (symbols, &self.pool) {
            (Ok(_), Some(_)) => {
                self.graphs = Some(Mutex::new(Graphs {
                    mode: GraphMode::Eager,
                    cache: GraphCache::default(),
                    stats: GraphStats::default(),
                }))
            }
            (Err(e), _) => eprintln!("notice: CUDA graphs off: {e:#}"),
            (_, None) => {
                eprintln!("notice: CUDA graphs off: the GPU has no stream-ordered allocation")
            }
        }
        self
    }

    /// What the CUDA graphs did so far (`None`: graphs off).
    pub fn graph_stats(&self) -> Option<GraphStats> {
        self.graphs.as_ref().map(|g| g.lock().unwrap().stats)
    }

    fn set_graph_mode(&self, mode: GraphMode) -> GraphMode {
        let graphs = self.graphs.as_ref().expect("graphs on");
        std::mem::replace(&mut graphs.lock().unwrap().mode, mode)
    }

    fn put_graph(&self, key: &[u64], entry: Entry<ExecGraph>) {
        let graphs = self.graphs.as_ref().expect("graphs on");
        graphs.lock().unwrap().cache.put(key.to_vec(), entry);
    }

    fn count(&self, f: impl FnOnce(&mut GraphStats)) {
        if let Some(g) = &self.graphs {
            f(&mut g.lock().unwrap().stats);
        }
    }

    /// Captures `region` into a graph and launches it. Where it cannot be captured, nothing of
    /// the capture ran: the region runs eagerly, the key is captured again next time after a
    /// [`Mismatch`] (a step that needed a host copy), and runs eagerly for good after any other
    /// failure (said once).
    fn capture_region(
        &self,
        key: &[u64],
        mismatches: u32,
        region: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let stream = self.stream.cu_stream();
        let fail = |why: String| {
            eprintln!(
                "notice: the training step runs without a CUDA graph at this batch shape: {why}"
            );
            self.count(|s| s.failures += 1);
            self.put_graph(key, Entry::Failed);
        };
        if let Err(e) = graph::begin_capture(stream) {
            fail(format!("{e:#}"));
            return region();
        }
        let live = Arc::new(AtomicUsize::new(0));
        let guard = ModeGuard::set(
            self,
            GraphMode::Capture {
                tape: Tape::default(),
                live: live.clone(),
                broken: None,
            },
            true,
        );
        let (ran, deferred) = deferring_frees(region);
        let GraphMode::Capture { tape, broken, .. } = guard.finish() else {
            unreachable!("the mode is only changed by its guard")
        };
        let leaked = live.load(Ordering::Relaxed);
        let mismatch = matches!(&ran, Err(e) if e.is::<Mismatch>());
        let why = match (&ran, &broken) {
            (Err(e), _) => Some(format!("{e:#}")),
            (_, Some(b)) => Some(b.clone()),
            _ => None,
        };
        let ended = graph::end_capture(stream, why.is_none());
        // Frees of the region's temporaries on an invalidated capture failed, and cudarc keeps
        // the first such error for the next call: it says nothing about the eager run below.
        if let Err(e) = self.ctx.check_err() {
            if why.is_none() {
                eprintln!("notice: while capturing a CUDA graph: {e}");
            }
        }
        let (why, exec) = match (why, ended) {
            (None, Ok(Some(exec))) => match exec.launch(stream) {
                Ok(()) => (None, Some(exec)),
                Err(e) => (Some(format!("{e:#}")), None),
            },
            (why, ended) => (
                Some(
                    why.or_else(|| ended.err().map(|e| format!("{e:#}")))
                        .unwrap_or_else(|| "the capture made no graph".into()),
                ),
                None,
            ),
        };
        // After the capture ended, and after the graph's launch when it made one.
        drop(deferred);
        match (why, exec) {
            (None, Some(exec)) => {
                self.count(|s| s.captures += 1);
                // What the eager first run left reserved in the pool (the graph has its own).
                self.trim_pool();
                if leaked == 0 {
                    self.put_graph(key, Entry::Ready(exec, tape, mismatches));
                } else {
                    // They are the graph's memory, real now that it has run, freed by their
                    // owners; the graph cannot be relaunched before.
                    fail(format!(
                        "{leaked} allocations made in the step outlive it (a cache filled while \
                         capturing)"
                    ));
                }
                Ok(())
            }
            (Some(why), _) if leaked > 0 => {
                // Something kept an allocation of a graph that never ran: its address is not
                // backed, and the step cannot be rerun without it.
                self.put_graph(key, Entry::Failed);
                bail!(
                    "a CUDA graph capture failed ({why}) after {leaked} of its allocations were \
                     kept beyond the step; rerun without --cuda-graphs"
                )
            }
            (Some(_), _) if mismatch && mismatches + 1 < graph::MAX_MISMATCHES => {
                self.count(|s| s.mismatches += 1);
                self.put_graph(key, Entry::Seen(mismatches + 1));
                region()
            }
            (Some(why), _) => {
                fail(why);
                region()
            }
            (None, None) => unreachable!("a kept capture has a graph"),
        }
    }

    /// Replays `key`'s graph for `region`: the region's host code runs against the tape, the
    /// changed kernel arguments are patched in, and the graph is launched. On a [`Mismatch`],
    /// nothing was queued: the region runs eagerly and is captured again next time (for good
    /// eagerly after [`graph::MAX_MISMATCHES`]).
    fn replay_region(
        &self,
        key: &[u64],
        (exec, tape, mismatches): (ExecGraph, Tape, u32),
        region: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let guard = ModeGuard::set(self, GraphMode::Replay(Replay::new(tape)), false);
        let (ran, deferred) = deferring_frees(region);
        let GraphMode::Replay(replay) = guard.finish() else {
            unreachable!("the mode is only changed by its guard")
        };
        let launched = ran
            .and_then(|()| Ok(replay.finish()?))
            .and_then(|(tape, patches)| {
                exec.patch(&patches)?;
                exec.launch(self.stream.cu_stream())?;
                Ok((tape, patches.len()))
            });
        // After the graph's launch, or before the region runs again eagerly.
        drop(deferred);
        match launched {
            Ok((tape, patched)) => {
                self.count(|s| {
                    s.replays += 1;
                    s.patched_nodes += patched as u64;
                });
                if let Some((lt, _)) = &self.lt {
                    lt.count_replayed(tape.calls_returning(graph::LT_CALL, 1));
                }
                self.put_graph(key, Entry::Ready(exec, tape, mismatches));
                Ok(())
            }
            Err(e) if e.is::<Mismatch>() => {
                self.count(|s| s.mismatches += 1);
                drop(exec);
                if mismatches + 1 >= graph::MAX_MISMATCHES {
                    eprintln!(
                        "notice: the training step runs without a CUDA graph at this batch shape: \
                         it changed {} times ({e:#})",
                        mismatches + 1
                    );
                    self.count(|s| s.failures += 1);
                    self.put_graph(key, Entry::Failed);
                } else {
                    self.put_graph(key, Entry::Seen(mismatches + 1));
                }
                region()
            }
            Err(e) => {
                // A real error (the same would stop an eager run), or a patch or launch that
                // failed: the tape may no longer match the graph's nodes, so the graph goes.
                self.put_graph(key, Entry::Seen(mismatches));
                Err(e)
            }
        }
    }

    /// Returns the pool's unused memory to the driver (best effort).
    fn trim_pool(&self) {
        if let Some(pool) = &self.pool {
            // SAFETY: a live pool; only memory no allocation holds is released.
            let _ = unsafe { dsys::cuMemPoolTrimTo(pool.0, 0) };
        }
    }

    /// Waits for every queued operation; reports an asynchronous kernel failure.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA stream: {e}"))
    }

    /// The stream every op of this backend is queued on, in order (for `timing`).
    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("cannot bind the CUDA context: {e}"))
    }

    fn alloc_raw<T: cudarc::driver::DeviceRepr>(&self, len: usize) -> Result<Arc<Buffer<T>>> {
        self.bind()?;
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let mut graphs = self.graphs.as_ref().map(|g| g.lock().unwrap());
        if let Some(GraphMode::Replay(replay)) = graphs.as_deref_mut().map(|g| &mut g.mode) {
            // The address the graph's allocation node gives this allocation at every launch.
            let ptr = replay.alloc(bytes)?;
            return Ok(Arc::new(Buffer {
                _slice: None,
                ptr,
                _captured: None,
            }));
        }
        // At least one element: a zero-byte allocation is not portable.
        // SAFETY: the contents are written before being read (or zeroed by the caller).
        let slice = unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| {
            let what = format!(
                "{} bytes for {len} elements",
                len.max(1) * std::mem::size_of::<T>()
            );
            if e.0 == dsys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                anyhow::Error::new(OutOfMemory { what })
            } else {
                anyhow!("cannot allocate {what} on the GPU: {e}")
            }
        })?;
        let mut buf = Buffer::new(slice, &self.stream);
        if let Some(GraphMode::Capture { tape, live, .. }) =
            graphs.as_deref_mut().map(|g| &mut g.mode)
        {
            tape.alloc(bytes, buf.ptr);
            buf._captured = Some(CapturedAlloc::new(live));
        }
        Ok(Arc::new(buf))
    }

    /// [`Backend::run_region`]: eagerly without graphs; with graphs, eagerly the first time
    /// `key` is seen, captured the second, replayed after that.
    fn run_region_inner(&self, key: &[u64], region: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let Some(graphs) = &self.graphs else {
            return region();
        };
        self.bind()?;
        let entry = graphs.lock().unwrap().cache.take(key);
        match entry {
            None => {
                // First seen: run eagerly, filling the caches a capture must find full.
                self.put_graph(key, Entry::Seen(0));
                region()
            }
            Some(Entry::Failed) => {
                self.put_graph(key, Entry::Failed);
                region()
            }
            Some(Entry::Seen(mismatches)) => self.capture_region(key, mismatches, region),
            Some(Entry::Ready(exec, tape, mismatches)) => {
                self.replay_region(key, (exec, tape, mismatches), region)
            }
        }
    }

    /// Fails inside a graph region: a host copy there would be baked into the graph, or (when
    /// replaying) not made at all.
    fn outside_graphs(&self, what: &str) -> Result<()> {
        if let Some(g) = &self.graphs {
            if !matches!(g.lock().unwrap().mode, GraphMode::Eager) {
                return Err(anyhow::Error::new(Mismatch {
                    at: 0,
                    what: format!("{what} inside a CUDA graph region"),
                }));
            }
        }
        Ok(())
    }

    /// Queues a library call or a memset/copy (`queue` returns what the host learns from it),
    /// recording it while capturing; when replaying, only checks that it is the recorded call
    /// and returns what that returned.
    fn queue_call(&self, fingerprint: &[u64], queue: impl FnOnce() -> Result<u64>) -> Result<u64> {
        let Some(g) = &self.graphs else {
            return queue();
        };
        let mut g = g.lock().unwrap();
        match &mut g.mode {
            GraphMode::Eager => {
                drop(g);
                queue()
            }
            GraphMode::Replay(replay) => Ok(replay.call(fingerprint)?),
            GraphMode::Capture { .. } => {
                // Recorded after the call, whose return value is part of the record (the lock
                // is not held across it). The calls queue nothing else through the backend, so
                // the tape's order is the order a replay checks them in.
                drop(g);
                let returned = queue()?;
                let mut g = self.graphs.as_ref().unwrap().lock().unwrap();
                if let GraphMode::Capture { tape, .. } = &mut g.mode {
                    tape.call(fingerprint.to_vec(), returned);
                }
                Ok(returned)
            }
        }
    }

    fn scratch(&self, len: usize) -> Result<CudaTensor> {
        self.scratch_of(len, Dtype::F32)
    }

    /// `len` elements of `dtype`, uninitialized.
    fn scratch_of(&self, len: usize, dtype: Dtype) -> Result<CudaTensor> {
        Ok(CudaTensor {
            buf: self.alloc_raw::<f32>((len * dtype.size()).div_ceil(4))?,
            offset: 0,
            len,
            dtype,
        })
    }

    /// A tensor's elements as `T` (of its element size: f32, or u16 for a 16-bit tensor's
    /// bits); the caller has checked that no region is running.
    fn download_as<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        t: &CudaTensor,
    ) -> Result<Vec<T>> {
        assert_eq!(
            std::mem::size_of::<T>(),
            t.dtype.size(),
            "download_as: element size"
        );
        let mut out = vec![T::default(); t.len];
        self.bind()?;
        if t.len > 0 {
            // SAFETY: t addresses t.len elements of T's size; the stream is synchronized before
            // `out` is read or dropped.
            unsafe { dres::memcpy_dtoh_async(&mut out, t.any_ptr(), self.stream.cu_stream()) }
                .map_err(|e| anyhow!("device-to-host copy: {e}"))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn upload_raw<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<Arc<Buffer<T>>> {
        self.outside_graphs("a host-to-device copy")?;
        let buf = self.alloc_raw::<T>(data.len())?;
        if !data.is_empty() {
            // SAFETY: the allocation holds data.len() elements; a pageable source is staged
            // before the call returns.
            unsafe { dres::memcpy_htod_async(buf.ptr, data, self.stream.cu_stream()) }
                .map_err(|e| anyhow!("host-to-device copy: {e}"))?;
        }
        Ok(buf)
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| anyhow!("no kernel {name} loaded"))
    }

    /// Launches `kernel` (one of `K`'s family) with `params` in its declared order (see
    /// `kernel_params`: how a launch's arguments are checked against the kernel's parameters).
    fn launch<K: KernelParams>(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &K,
    ) -> Result<()> {
        ensure!(
            K::SIGNATURE.kernels.contains(&kernel),
            "{kernel} launched with the parameters of {}",
            K::SIGNATURE.kernels[0]
        );
        let args = params.args();
        let f = self.func(kernel)?;
        self.bind()?;
        let mut graphs = self.graphs.as_ref().map(|g| g.lock().unwrap());
        let mode = graphs.as_deref_mut().map(|g| &mut g.mode);
        let recorded = || Launch {
            func: f.cu_function() as usize,
            grid,
            block,
            smem,
            args: args.to_vec(),
        };
        if let Some(GraphMode::Replay(replay)) = mode {
            return Ok(replay.kernel(recorded())?);
        }
        let mut addrs: Vec<*mut c_void> = args.iter().map(Arg::addr).collect();
        // SAFETY: the arguments match the kernel's parameter list (`K`'s declaration, checked
        // against the compiled kernels by tests/kernel_signatures.rs) and live until
        // cuLaunchKernel returns (it copies them); pointers are into live allocations.
        unsafe {
            dres::launch_kernel(
                f.cu_function(),
                grid,
                block,
                smem,
                self.stream.cu_stream(),
                &mut addrs,
            )
        }
        .map_err(|e| anyhow!("launching {kernel}: {e}"))?;
        if let Some(GraphMode::Capture { tape, broken, .. }) = mode {
            match graph::last_captured_node(self.stream.cu_stream()) {
                Ok(node) => tape.kernel(recorded(), node),
                Err(e) => *broken = Some(format!("{kernel}: {e:#}")),
            }
        }
        Ok(())
    }

    /// Launch of an element-wise kernel over `n` elements (block 256, grid-stride).
    fn elementwise_grid(&self, n: usize) -> (u32, u32, u32) {
        (grid_1d(n, 4, 256, 16 * self.sms), 1, 1)
    }

    /// A ones vector of at least `len` elements.
    fn ones(&self, len: usize) -> Result<CudaTensor> {
        let mut ones = self.ones.lock().unwrap();
        if let Some(t) = ones.as_ref() {
            if t.len >= len {
                return Ok(t.clone());
            }
        }
        let cap = len.max(1024).next_power_of_two();
        let t = CudaTensor {
            buf: self.upload_raw(&vec![1.0f32; cap])?,
            offset: 0,
            len: cap,
            dtype: Dtype::F32,
        };
        *ones = Some(t.clone());
        Ok(t)
    }

    fn layout(&self, layout: &SeqLayout) -> Result<Arc<LayoutBuf>> {
        let mut cache = self.layouts.lock().unwrap();
        if let Some(i) = cache.iter().position(|l| &l.layout == layout) {
            let l = cache.remove(i);
            cache.push(l.clone());
            return Ok(l);
        }
        ensure!(
            layout.rows.len() == layout.batch() && layout.valid.len() == layout.batch(),
            "a SeqLayout's starts, rows and valid differ in length"
        );
        let mut data = Vec::with_capacity(3 * layout.batch());
        data.extend_from_slice(&layout.starts);
        data.extend_from_slice(&layout.rows);
        data.extend_from_slice(&layout.valid);
        let l = Arc::new(LayoutBuf {
            layout: layout.clone(),
            buf: self.upload_raw(&data)?,
        });
        if cache.len() >= LAYOUT_CACHE {
            cache.remove(0);
        }
        cache.push(l.clone());
        Ok(l)
    }

    /// The device copy of an AdamW segment table, uploaded the first time it is seen (a few
    /// tables are kept: one per parameter group a run updates).
    fn adamw_table(&self, table: Vec<u64>) -> Result<Arc<Buffer<u64>>> {
        let mut cache = self.adamw_tables.lock().unwrap();
        if let Some((_, buf)) = cache.iter().find(|(t, _)| *t == table) {
            return Ok(buf.clone());
        }
        let buf = self.upload_raw(&table)?;
        if cache.len() >= ADAMW_TABLES {
            cache.remove(0);
        }
        cache.push((table, buf.clone()));
        Ok(buf)
    }

    /// An fp32 tensor as this backend's dense-layer GEMMs read it: itself (fp32, TF32), or a
    /// 16-bit copy cast for this call (fp16, bf16), kept alive by the returned operand until the
    /// GEMM is queued (its memory is then freed stream-ordered, after the GEMM has read it).
    fn gemm_operand(&self, t: &CudaTensor) -> Result<GemmOperand> {
        let (kernel, dtype) = match self.precision {
            MatmulPrecision::F32 | MatmulPrecision::Tf32 => {
                return Ok(GemmOperand::fp32(t.device_ptr()))
            }
            MatmulPrecision::F16 => ("cast_f32_to_f16", blas::cudaDataType::CUDA_R_16F),
            MatmulPrecision::Bf16 => ("cast_f32_to_bf16", blas::cudaDataType::CUDA_R_16BF),
        };
        // A weight: the region's copy, cast once (`refresh_weight_copies`).
        if let Some(c) = self.weight_copies.lock().unwrap().as_ref() {
            if let Some(ptr) = c.copy_of(t) {
                return Ok(GemmOperand {
                    ptr,
                    dtype,
                    _copy: Some(c.copy.clone()),
                });
            }
        }
        let copy = self.alloc_raw::<u16>(t.len)?;
        self.launch_cast(kernel, t, copy.ptr)?;
        Ok(GemmOperand {
            ptr: copy.ptr,
            dtype,
            _copy: Some(copy),
        })
    }

    /// A tensor a dense layer reads as its GEMMs' `x` operand: fp32 (cast per call as
    /// [`CudaBackend::gemm_operand`] does), or already stored in the GEMMs' 16-bit format (read
    /// as it is).
    fn gemm_input(&self, t: &CudaTensor, what: &str) -> Result<GemmOperand> {
        if !self.stored_in_matmul_format(t, what)? {
            return self.gemm_operand(t);
        }
        let dtype = match t.dtype {
            Dtype::Bf16 => blas::cudaDataType::CUDA_R_16BF,
            _ => blas::cudaDataType::CUDA_R_16F,
        };
        Ok(GemmOperand {
            ptr: t.any_ptr(),
            dtype,
            _copy: None,
        })
    }

    /// Whether `t` is stored in the GEMMs' 16-bit format (`false`: fp32); an error for any other
    /// type (a tensor of another backend's format).
    fn stored_in_matmul_format(&self, t: &CudaTensor, what: &str) -> Result<bool> {
        let format = self.precision.storage_dtype();
        ensure!(
            t.dtype == Dtype::F32 || t.dtype == format,
            "{what} is {}, neither fp32 nor this backend's matmul format ({})",
            t.dtype.name(),
            format.name()
        );
        Ok(t.dtype != Dtype::F32)
    }

    /// Runs `write`, which writes an fp32 result into the tensor it is given, for `out`: into
    /// `out` itself when it is fp32; else into fp32 scratch then cast into `out` (one rounding
    /// of the fp32 result, as the CPU reference stores it).
    fn write_output(
        &self,
        out: &CudaTensor,
        write: impl FnOnce(&CudaTensor) -> Result<()>,
    ) -> Result<()> {
        if out.dtype == Dtype::F32 {
            return write(out);
        }
        let wide = self.scratch(out.len)?;
        write(&wide)?;
        self.cast_into(out, &wide)
    }

    /// `dst` (16-bit) = `src` (fp32) rounded to nearest even.
    fn cast_into(&self, dst: &CudaTensor, src: &CudaTensor) -> Result<()> {
        ensure!(
            dst.len == src.len && src.dtype == Dtype::F32,
            "cast of {} {} elements into {}",
            src.len,
            src.dtype.name(),
            dst.len
        );
        let kernel = match dst.dtype {
            Dtype::F16 => "cast_f32_to_f16",
            Dtype::Bf16 => "cast_f32_to_bf16",
            Dtype::F32 => bail!("cast_into: an fp32 destination"),
        };
        self.launch_cast(kernel, src, dst.any_ptr())
    }

    /// `kernel` (a `cast_f32_to_*` of cast.cu) over the fp32 `src` into the 16-bit elements at
    /// `dst`, which hold `src.len` of them.
    fn launch_cast(&self, kernel: &str, src: &CudaTensor, dst: u64) -> Result<()> {
        if src.len == 0 {
            return Ok(());
        }
        self.launch(
            kernel,
            (grid_1d(src.len, 1, 256, 32 * self.sms), 1, 1),
            (256, 1, 1),
            0,
            &Cast {
                x: src.device_ptr(),
                y: dst,
                n: src.len as u64,
            },
        )
    }

    /// `outᵀ(n×rows) = op(w)·xᵀ + bias` as one cuBLASLt GEMM with the bias in its epilogue (see
    /// `lt`), `out` fp32 or 16-bit; `false` (nothing queued) where cuBLASLt is off or refuses.
    /// Whether it took the call is part of what a graph records.
    fn lt_linear_forward(
        &self,
        out: &CudaTensor,
        w: &GemmOperand,
        x: &GemmOperand,
        bias: &CudaTensor,
        (rows, k, n): (usize, usize, usize),
    ) -> Result<bool> {
        let Some((lt, _)) = &self.lt else {
            return Ok(false);
        };
        let (ty, compute) = self.lt_types();
        let g = BiasGemm {
            a: w.ptr,
            a_type: ty,
            b: x.ptr,
            b_type: ty,
            bias: bias.device_ptr(),
            d: out.any_ptr(),
            d_type: match out.dtype {
                Dtype::F32 => LtDataType::CUDA_R_32F,
                _ => ty,
            },
            mnk: (n, rows, k),
            compute,
        };
        let fingerprint = [
            graph::LT_CALL,
            g.a,
            g.b,
            g.bias,
            g.d,
            n as u64,
            rows as u64,
            k as u64,
            ty as u64,
            compute as u64,
            g.d_type as u64,
        ];
        let queued = self.queue_call(&fingerprint, || {
            self.bind()?;
            Ok(lt.matmul_bias(&g, self.stream.cu_stream() as _)? as u64)
        })?;
        Ok(queued == 1)
    }

    /// `outᵀ(n×rows) = bias(n×1)·ones(1×rows)`: every row of `out` set to the bias.
    fn fill_with_bias(
        &self,
        out: &CudaTensor,
        bias: &CudaTensor,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let ones = self.ones(rows)?;
        self.gemm(
            false,
            false,
            n,
            rows,
            1,
            bias.device_ptr(),
            n,
            ones.device_ptr(),
            1,
            0.0,
            out.device_ptr(),
            n,
        )
    }

    /// How many dense-layer forwards took cuBLASLt's bias epilogue (0 without cuBLASLt).
    pub fn bias_epilogue_gemms(&self) -> u64 {
        self.lt.as_ref().map_or(0, |(lt, _)| lt.queued())
    }

    /// The operand and compute types of the dense layers' GEMMs, as cuBLASLt names them.
    fn lt_types(&self) -> (LtDataType, LtComputeType) {
        match self.precision {
            MatmulPrecision::F32 => (LtDataType::CUDA_R_32F, LtComputeType::CUBLAS_COMPUTE_32F),
            MatmulPrecision::Tf32 => (
                LtDataType::CUDA_R_32F,
                LtComputeType::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            MatmulPrecision::F16 => (LtDataType::CUDA_R_16F, LtComputeType::CUBLAS_COMPUTE_32F),
            MatmulPrecision::Bf16 => (LtDataType::CUDA_R_16BF, LtComputeType::CUBLAS_COMPUTE_32F),
        }
    }

    /// `dbias += Σ_rows dout` (`dout` `[rows, n]`), and `dout` as the GEMMs read it, in one
    /// pass over `dout` (`bias_grad.cu`): the 16-bit copy is written by the same kernel that
    /// sums the columns.
    fn bias_grad_and_operand(
        &self,
        dout: &CudaTensor,
        dbias: &CudaTensor,
        rows: usize,
        n: usize,
    ) -> Result<GemmOperand> {
        let (format, dtype) = match self.precision {
            MatmulPrecision::F32 | MatmulPrecision::Tf32 => (0, blas::cudaDataType::CUDA_R_32F),
            MatmulPrecision::F16 => (1, blas::cudaDataType::CUDA_R_16F),
            MatmulPrecision::Bf16 => (2, blas::cudaDataType::CUDA_R_16BF),
        };
        let copy = match format {
            0 => None,
            _ => Some(self.alloc_raw::<u16>(dout.len)?),
        };
        if rows > 0 && n > 0 {
            // About four blocks per SM, each over 32 columns and a share of the rows.
            let col_tiles = n.div_ceil(32);
            let parts = (4 * self.sms as usize)
                .div_ceil(col_tiles)
                .min(rows.div_ceil(8))
                .clamp(1, 65535);
            let partials = self.scratch(parts * n)?;
            self.launch(
                "bias_grad_partial",
                (u32_of(col_tiles, "bias columns")?, parts as u32, 1),
                (32, 8, 1),
                0,
                &BiasGradPartial {
                    partials: partials.device_ptr(),
                    copy: copy.as_ref().map_or(0, |c| c.ptr),
                    format,
                    dout: dout.device_ptr(),
                    rows: u32_of(rows, "rows")?,
                    cols: u32_of(n, "n")?,
                },
            )?;
            self.launch(
                "bias_grad_reduce",
                (u32_of(n.div_ceil(256), "bias columns")?, 1, 1),
                (256, 1, 1),
                0,
                &BiasGradReduce {
                    dbias: dbias.device_ptr(),
                    partials: partials.device_ptr(),
                    parts: parts as u32,
                    cols: u32_of(n, "n")?,
                },
            )?;
        }
        Ok(GemmOperand {
            ptr: copy.as_ref().map_or(dout.device_ptr(), |c| c.ptr),
            dtype,
            _copy: copy,
        })
    }

    /// The compute type of the dense layers' GEMMs.
    fn gemm_compute(&self) -> blas::cublasComputeType_t {
        match self.precision {
            MatmulPrecision::Tf32 => blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        }
    }

    /// `C = alpha·op(A)·op(B) + beta·C`, column-major, fp32 data (see the module header).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        self.gemm_ex(
            trans_a,
            trans_b,
            (m, n, k),
            (&GemmOperand::fp32(a), lda),
            (&GemmOperand::fp32(b), ldb),
            beta,
            (c, ldc),
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    }

    /// `C (fp32) = op(A)·op(B) + beta·C` with A and B of their own data types, accumulated as
    /// `compute` says.
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        trans_a: bool,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        (a, lda): (&GemmOperand, usize),
        (b, ldb): (&GemmOperand, usize),
        beta: f32,
        (c, ldc): (u64, usize),
        compute: blas::cublasComputeType_t,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1.0f32;
        let fingerprint = [
            1,
            trans_a as u64,
            trans_b as u64,
            m as u64,
            n as u64,
            k as u64,
            a.ptr,
            a.dtype as u64,
            lda as u64,
            b.ptr,
            b.dtype as u64,
            ldb as u64,
            beta.to_bits() as u64,
            c,
            ldc as u64,
            compute as u64,
        ];
        self.queue_call(&fingerprint, || {
            let handle = self.blas.lock().unwrap();
            self.bind()?;
            // SAFETY: the pointers address matrices of the given shapes (lengths checked by the
            // callers); alpha/beta are host scalars (the default pointer mode).
            let status = unsafe {
                blas::cublasGemmEx(
                    handle.0,
                    op(trans_a),
                    op(trans_b),
                    i32_of(m, "m")?,
                    i32_of(n, "n")?,
                    i32_of(k, "k")?,
                    &alpha as *const f32 as *const c_void,
                    a.ptr as *const c_void,
                    a.dtype,
                    i32_of(lda.max(1), "lda")?,
                    b.ptr as *const c_void,
                    b.dtype,
                    i32_of(ldb.max(1), "ldb")?,
                    &beta as *const f32 as *const c_void,
                    c as *mut c_void,
                    blas::cudaDataType::CUDA_R_32F,
                    i32_of(ldc.max(1), "ldc")?,
                    compute,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            blas_check("cublasGemmEx", status).map(|_| 0)
        })
        .map(|_| ())
    }

    fn check_ids(&self, ids: &CudaIds, entries: usize, what: &str) -> Result<()> {
        if let Some(&bad) = ids.host.iter().find(|&&i| i as usize >= entries) {
            bail!("{what} index {bad} out of range (the table has {entries} rows)");
        }
        Ok(())
    }

    fn check_layout(&self, layout: &SeqLayout) -> Result<()> {
        ensure!(
            layout.is_back_to_back(),
            "the sequences must lie back to back from row 0 (starts {:?}, rows {:?})",
            layout.starts,
            layout.rows
        );
        for b in 0..layout.batch() {
            let (r, v) = (layout.rows[b], layout.valid[b]);
            ensure!(
                r < 1 << 16,
                "sequences are limited to 65535 rows (sequence {b} has {r})"
            );
            ensure!(
                v >= 1 && v <= r,
                "sequence {b} has {v} valid rows out of {r} (needs 1 ≤ valid ≤ rows)"
            );
        }
        ensure!(
            layout.batch() < 1 << 16,
            "batches are limited to 65535 sequences"
        );
        Ok(())
    }

    /// The attention kernels for `head_dim` under this backend's precision: the name prefix
    /// before `forward_…` / `backward_{dq,dkdv}_…`, the suffix after it, and the rows per
    /// block. The tensor-core kernels (attention_tc.cu) when [`attention_rounding`] says so
    /// (and the GPU is sm_80 or newer), attention.cu's fp32 kernels otherwise.
    fn attention_kernels(&self, head_dim: usize) -> Result<(&'static str, String, usize)> {
        Ok(match Backend::attention_rounding(self, head_dim) {
            MatmulPrecision::F16 => ("attention_tc_", format!("f16_d{head_dim}"), 64),
            MatmulPrecision::Bf16 => ("attention_tc_", format!("bf16_d{head_dim}"), 64),
            _ => {
                let (variant, rows) = Self::attention_variant(head_dim)?;
                ("attention_", format!("f32_{variant}"), rows)
            }
        })
    }

    /// `qkv` as the attention kernels `prefix` names read it: fp32 for attention.cu; 16-bit for
    /// attention_tc.cu, as stored, or cast into scratch (the values the kernels would round it
    /// to).
    fn attention_qkv(&self, qkv: &CudaTensor, prefix: &str, what: &str) -> Result<CudaTensor> {
        if prefix != "attention_tc_" || self.attention_16_bit(qkv, "qkv", prefix, what)? {
            return Ok(qkv.clone());
        }
        let narrow = self.scratch_of(qkv.len, self.precision.storage_dtype())?;
        self.cast_into(&narrow, qkv)?;
        Ok(narrow)
    }

    /// Whether attention's `qkv` or `out` (`name`) is stored 16-bit: only in the matmul format,
    /// and only where attention_tc.cu runs (`prefix`), which reads qkv and writes out so (out
    /// rounded once, the `_out16` kernels); an error where fp32 attention would misread it.
    fn attention_16_bit(
        &self,
        t: &CudaTensor,
        name: &str,
        prefix: &str,
        what: &str,
    ) -> Result<bool> {
        if prefix != "attention_tc_" {
            ensure!(
                t.dtype == Dtype::F32,
                "{what}: a {} {name}, but this head dim runs fp32 attention",
                t.dtype.name()
            );
            return Ok(false);
        }
        self.stored_in_matmul_format(t, what)
    }

    /// The attention variant suffix and its rows per block for `head_dim`.
    fn attention_variant(head_dim: usize) -> Result<(&'static str, usize)> {
        Ok(match head_dim {
            32 => ("d32", 64),
            64 => ("d64", 32),
            1..=128 => ("generic", 16),
            _ => bail!("attention head_dim {head_dim} is not supported (1..=128)"),
        })
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Ids = CudaIds;

    fn name(&self) -> String {
        let gemm = match self.precision {
            MatmulPrecision::F32 => "fp32",
            MatmulPrecision::Tf32 => "tf32 GEMMs",
            MatmulPrecision::F16 => "fp16 GEMMs",
            MatmulPrecision::Bf16 => "bf16 GEMMs",
        };
        format!("{} {gemm}", self.name)
    }
    fn matmul_precision(&self) -> MatmulPrecision {
        self.precision
    }
    fn peak_memory_bytes(&self) -> Option<u64> {
        let pool = self.peak_pool_bytes().ok().flatten()?;
        Some(pool + self.graph_memory_high())
    }
    fn reset_peak_memory(&self) {
        if self.graphs.is_some() {
            let mut zero = 0u64;
            // SAFETY: the attribute is a u64 in-parameter. Best effort, as below.
            let _ = unsafe {
                dsys::cuDeviceSetGraphMemAttribute(
                    self.ctx.cu_device(),
                    dsys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut c_void,
                )
            };
        }
        if let Some(pool) = &self.pool {
            // Best effort: a failure leaves the peak counting from an earlier point.
            let _ = set_pool_attribute(
                pool.0,
                dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                0,
            );
        }
    }

    // ---- memory ----
    fn zeros(&self, len: usize) -> Result<CudaTensor> {
        let t = self.scratch(len)?;
        self.fill_zero(&t)?;
        Ok(t)
    }

    fn prepare_layout(&self, layout: &SeqLayout) -> Result<()> {
        self.layout(layout).map(|_| ())
    }

    fn runs_graphs(&self) -> bool {
        self.graphs.is_some()
    }

    fn attention_rounding(&self, head_dim: usize) -> MatmulPrecision {
        match self.tensor_core_attention {
            true => attention_rounding(self.precision, head_dim),
            false => MatmulPrecision::F32,
        }
    }

    fn pads_to_buckets(&self) -> bool {
        self.bucket_padding || self.runs_graphs()
    }

    fn prepare_weight_copies(&self, params: &CudaTensor) -> Result<()> {
        if matches!(self.precision, MatmulPrecision::F32 | MatmulPrecision::Tf32) {
            return Ok(());
        }
        let mut copies = self.weight_copies.lock().unwrap();
        if copies.as_ref().is_some_and(|c| c.is_for(params)) {
            return Ok(());
        }
        self.outside_graphs("allocating the weights' 16-bit copy")?;
        // Another model's copy is freed first: never two copies at once.
        drop(copies.take());
        *copies = Some(WeightCopies {
            params: Arc::downgrade(&params.buf),
            offset: params.offset,
            len: params.len,
            copy: self.alloc_raw::<u16>(params.len)?,
            fresh: false,
        });
        Ok(())
    }

    fn refresh_weight_copies(&self, params: &CudaTensor) -> Result<()> {
        let kernel = match self.precision {
            MatmulPrecision::F32 | MatmulPrecision::Tf32 => return Ok(()),
            MatmulPrecision::F16 => "cast_f32_to_f16",
            MatmulPrecision::Bf16 => "cast_f32_to_bf16",
        };
        let copy = match self.weight_copies.lock().unwrap().as_ref() {
            Some(c) if c.is_for(params) => c.copy.ptr,
            _ => return Ok(()),
        };
        if !self.in_region.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.launch_cast(kernel, params, copy)?;
        if let Some(c) = self.weight_copies.lock().unwrap().as_mut() {
            c.fresh = true;
        }
        Ok(())
    }

    fn run_region(&self, key: &[u64], region: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let _region = RegionGuard::enter(self);
        self.run_region_inner(key, region)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaTensor> {
        Ok(CudaTensor {
            buf: self.upload_raw(data)?,
            offset: 0,
            len: data.len(),
            dtype: Dtype::F32,
        })
    }

    fn upload_ids(&self, data: &[u32]) -> Result<CudaIds> {
        Ok(CudaIds {
            buf: self.upload_raw(data)?,
            host: Arc::new(data.to_vec()),
        })
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.outside_graphs("a read-back")?;
        let widen = |bits: Vec<u16>, f: fn(u16) -> f32| bits.into_iter().map(f).collect();
        Ok(match t.dtype {
            Dtype::F32 => self.download_as::<f32>(t)?,
            Dtype::F16 => widen(self.download_as(t)?, |b| half::f16::from_bits(b).to_f32()),
            Dtype::Bf16 => widen(self.download_as(t)?, |b| half::bf16::from_bits(b).to_f32()),
        })
    }

    fn zeros_in_matmul_format(&self, len: usize) -> Result<CudaTensor> {
        let t = self.scratch_of(len, self.precision.storage_dtype())?;
        self.fill_zero(&t)?;
        Ok(t)
    }

    fn dtype(&self, t: &CudaTensor) -> Dtype {
        t.dtype
    }

    fn view(&self, t: &CudaTensor, offset: usize, len: usize) -> CudaTensor {
        assert!(
            offset + len <= t.len,
            "view {offset}+{len} out of a tensor of {}",
            t.len
        );
        CudaTensor {
            buf: t.buf.clone(),
            offset: t.offset + offset,
            len,
            dtype: t.dtype,
        }
    }

    fn len(&self, t: &CudaTensor) -> usize {
        t.len
    }

    fn fill_zero(&self, t: &CudaTensor) -> Result<()> {
        if t.len == 0 {
            return Ok(());
        }
        let (ptr, bytes) = (t.any_ptr(), t.len * t.dtype.size());
        self.queue_call(&[3, ptr, bytes as u64], || {
            self.bind()?;
            // SAFETY: t addresses t.len elements.
            unsafe { dres::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
                .map_err(|e| anyhow!("cuMemsetD8Async: {e}"))?;
            Ok(0)
        })
        .map(|_| ())
    }

    fn copy(&self, dst: &CudaTensor, src: &CudaTensor) -> Result<()> {
        ensure!(
            dst.len == src.len && (dst.dtype == src.dtype || src.dtype == Dtype::F32),
            "copy of {} {} elements into {} {}",
            src.len,
            src.dtype.name(),
            dst.len,
            dst.dtype.name()
        );
        if dst.dtype != src.dtype {
            return self.cast_into(dst, src);
        }
        if src.len == 0 {
            return Ok(());
        }
        let bytes = src.len * src.dtype.size();
        let (to, from) = (dst.any_ptr(), src.any_ptr());
        self.queue_call(&[4, to, from, bytes as u64], || {
            self.bind()?;
            // SAFETY: both address len elements and do not overlap (the trait's rule).
            unsafe { dres::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream()) }
                .map_err(|e| anyhow!("device-to-device copy: {e}"))?;
            Ok(0)
        })
        .map(|_| ())
    }

    // ---- dense layers ----
    fn linear_forward(
        &self,
        out: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: &CudaTensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(
            (out.len, x.len, w.len, bias.len) == (rows * n, rows * k, n * k, n),
            "linear_forward: lengths (out {}, x {}, w {}, bias {}) for rows {rows}, k {k}, n {n}",
            out.len,
            x.len,
            w.len,
            bias.len
        );
        self.stored_in_matmul_format(out, "linear_forward's out")?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.write_output(out, |target| self.fill_with_bias(target, bias, rows, n));
        }
        // Cast once: the fallbacks below read the same operands.
        let (w, x) = (
            self.gemm_operand(w)?,
            self.gemm_input(x, "linear_forward's x")?,
        );
        if self.lt_linear_forward(out, &w, &x, bias, (rows, k, n))? {
            return Ok(());
        }
        self.write_output(out, |target| {
            // A 16-bit output cuBLASLt refused: the epilogue into fp32 scratch, then the cast.
            if target.dtype != out.dtype
                && self.lt_linear_forward(target, &w, &x, bias, (rows, k, n))?
            {
                return Ok(());
            }
            self.fill_with_bias(target, bias, rows, n)?;
            // outᵀ(n×rows) += op(w)·xᵀ, w col-major k×n transposed.
            self.gemm_ex(
                true,
                false,
                (n, rows, k),
                (&w, k),
                (&x, k),
                1.0,
                (target.device_ptr(), n),
                self.gemm_compute(),
            )
        })
    }

    fn linear_backward(
        &self,
        dx: Option<&CudaTensor>,
        dx_accumulate: bool,
        dw: &CudaTensor,
        dbias: &CudaTensor,
        dout: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(
            (dw.len, dbias.len, dout.len, x.len, w.len) == (n * k, n, rows * n, rows * k, n * k),
            "linear_backward: lengths (dw {}, dbias {}, dout {}, x {}, w {}) for rows {rows}, \
             k {k}, n {n}",
            dw.len,
            dbias.len,
            dout.len,
            x.len,
            w.len
        );
        if let Some(dx) = dx {
            ensure!(
                dx.len == rows * k,
                "linear_backward: dx has {} elements, not {}",
                dx.len,
                rows * k
            );
        }
        let dout_op = self.bias_grad_and_operand(dout, dbias, rows, n)?;
        if let Some(dx) = dx {
            if n == 0 {
                if !dx_accumulate {
                    self.fill_zero(dx)?;
                }
            } else {
                // dxᵀ(k×rows) = wᵀ(k×n)·doutᵀ(n×rows)
                let w = self.gemm_operand(w)?;
                self.gemm_ex(
                    false,
                    false,
                    (k, rows, n),
                    (&w, k),
                    (&dout_op, n),
                    if dx_accumulate { 1.0 } else { 0.0 },
                    (dx.device_ptr(), k),
                    self.gemm_compute(),
                )?;
            }
        }
        if rows == 0 {
            return Ok(());
        }
        // dwᵀ(k×n) += xᵀ(k×rows)·dout(rows×n)
        let x = self.gemm_input(x, "linear_backward's x")?;
        self.gemm_ex(
            false,
            true,
            (k, n, rows),
            (&x, k),
            (&dout_op, n),
            1.0,
            (dw.device_ptr(), k),
            self.gemm_compute(),
        )
    }

    // ---- embeddings ----
    fn embeddings_forward(
        &self,
        out: &CudaTensor,
        word: &CudaTensor,
        position: &CudaTensor,
        token_type: &CudaTensor,
        ids: &CudaIds,
        positions: &CudaIds,
        type_ids: &CudaIds,
        hidden: usize,
    ) -> Result<()> {
        let rows = ids.len();
        ensure!(
            (out.len, positions.len(), type_ids.len()) == (rows * hidden, rows, rows),
            "embeddings_forward: lengths (out {}, positions {}, type_ids {}) for {rows} ids of \
             hidden {hidden}",
            out.len,
            positions.len(),
            type_ids.len()
        );
        if rows == 0 || hidden == 0 {
            return Ok(());
        }
        self.check_ids(ids, word.len / hidden, "word")?;
        self.check_ids(positions, position.len / hidden, "position")?;
        self.check_ids(type_ids, token_type.len / hidden, "token type")?;
        let block = (hidden.div_ceil(4).div_ceil(32) * 32).min(256) as u32;
        let grid = (
            hidden.div_ceil(4).div_ceil(block as usize) as u32,
            rows.min(65535) as u32,
            1,
        );
        self.launch(
            "embeddings_forward_f32",
            grid,
            (block, 1, 1),
            0,
            &EmbeddingsForward {
                out: out.device_ptr(),
                word: word.device_ptr(),
                position: position.device_ptr(),
                token_type: token_type.device_ptr(),
                ids: ids.device_ptr(),
                positions: positions.device_ptr(),
                type_ids: type_ids.device_ptr(),
                rows: u32_of(rows, "rows")?,
                hidden: u32_of(hidden, "hidden")?,
            },
        )
    }

    fn embeddings_backward(
        &self,
        dword: &CudaTensor,
        dposition: &CudaTensor,
        dtoken_type: &CudaTensor,
        dout: &CudaTensor,
        ids: &CudaIds,
        positions: &CudaIds,
        type_ids: &CudaIds,
        hidden: usize,
        padding_idx: Option<u32>,
    ) -> Result<()> {
        let rows = ids.len();
        ensure!(
            (dout.len, positions.len(), type_ids.len()) == (rows * hidden, rows, rows),
            "embeddings_backward: lengths (dout {}, positions {}, type_ids {}) for {rows} ids of \
             hidden {hidden}",
            dout.len,
            positions.len(),
            type_ids.len()
        );
        if rows == 0 || hidden == 0 {
            return Ok(());
        }
        self.check_ids(ids, dword.len / hidden, "word")?;
        self.check_ids(positions, dposition.len / hidden, "position")?;
        self.check_ids(type_ids, dtoken_type.len / hidden, "token type")?;
        let padding = match padding_idx {
            Some(p) => i32::try_from(p).map_err(|_| anyhow!("padding_idx {p} too large"))?,
            None => -1,
        };
        let grid = (
            hidden.div_ceil(256) as u32,
            rows.div_ceil(32).min(65535) as u32,
            1,
        );
        self.launch(
            "embeddings_backward_f32",
            grid,
            (256, 1, 1),
            0,
            &EmbeddingsBackward {
                dword: dword.device_ptr(),
                dposition: dposition.device_ptr(),
                dtoken_type: dtoken_type.device_ptr(),
                dout: dout.device_ptr(),
                ids: ids.device_ptr(),
                positions: positions.device_ptr(),
                type_ids: type_ids.device_ptr(),
                rows: u32_of(rows, "rows")?,
                hidden: u32_of(hidden, "hidden")?,
                padding_idx: padding,
            },
        )
    }

    // ---- LayerNorm ----
    fn layernorm_forward(
        &self,
        out: &CudaTensor,
        out_copy: Option<&CudaTensor>,
        mean: &CudaTensor,
        rstd: &CudaTensor,
        x: &CudaTensor,
        residual: Option<ResidualAdd<'_, CudaTensor>>,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(
            (out.len, x.len, mean.len, rstd.len, gamma.len, beta.len)
                == (rows * cols, rows * cols, rows, rows, cols, cols),
            "layernorm_forward: lengths (out {}, x {}, mean {}, rstd {}, gamma {}, beta {}) for \
             rows {rows}, cols {cols}",
            out.len,
            x.len,
            mean.len,
            rstd.len,
            gamma.len,
            beta.len
        );
        let (res, sum, dropout) = match residual {
            Some(ResidualAdd {
                residual: b,
                sum: s,
                dropout,
            }) => {
                ensure!(
                    (b.len, s.len) == (rows * cols, rows * cols),
                    "layernorm_forward: residual {} and sum {} elements, not {}",
                    b.len,
                    s.len,
                    rows * cols
                );
                (b.device_ptr(), s.device_ptr(), dropout)
            }
            None => (0, 0, Dropout::NONE),
        };
        let (kernel, copy) = match out_copy {
            None => ("layernorm_forward_f32", 0),
            Some(c) => {
                ensure!(
                    c.len == out.len,
                    "layernorm_forward: a copy of {} elements of an output of {}",
                    c.len,
                    out.len
                );
                ensure!(
                    self.stored_in_matmul_format(c, "layernorm_forward's copy")?,
                    "layernorm_forward: an fp32 copy of the output"
                );
                let kernel = match c.dtype {
                    Dtype::Bf16 => "layernorm_forward_f32_bf16",
                    _ => "layernorm_forward_f32_f16",
                };
                (kernel, c.any_ptr())
            }
        };
        if rows == 0 {
            return Ok(());
        }
        let warps = 8usize; // block 256
        let grid = rows.div_ceil(warps).min(65535) as u32;
        self.launch(
            kernel,
            (grid, 1, 1),
            (256, 1, 1),
            0,
            &LayerNormForward {
                out: out.device_ptr(),
                out_copy: copy,
                mean: mean.device_ptr(),
                rstd: rstd.device_ptr(),
                x: x.device_ptr(),
                residual: res,
                sum,
                gamma: gamma.device_ptr(),
                beta: beta.device_ptr(),
                rows: u32_of(rows, "rows")?,
                cols: u32_of(cols, "cols")?,
                eps,
                p: dropout_p(dropout),
                seed: dropout.seed,
                stream: dropout.stream,
            },
        )
    }

    fn layernorm_backward(
        &self,
        dx: &CudaTensor,
        dgamma: &CudaTensor,
        dbeta: &CudaTensor,
        dout: &CudaTensor,
        x: &CudaTensor,
        mean: &CudaTensor,
        rstd: &CudaTensor,
        gamma: &CudaTensor,
        rows: usize,
        cols: usize,
        branch: Option<BranchGrad<'_, CudaTensor>>,
    ) -> Result<()> {
        let (dbranch, dropout) = match branch {
            Some(BranchGrad { dx: d, dropout }) => {
                ensure!(
                    d.len == rows * cols,
                    "layernorm_backward: the branch gradient has {} elements, not {}",
                    d.len,
                    rows * cols
                );
                (d.device_ptr(), dropout)
            }
            None => (0, Dropout::NONE),
        };
        ensure!(
            (dx.len, dout.len, x.len, mean.len, rstd.len)
                == (rows * cols, rows * cols, rows * cols, rows, rows)
                && (dgamma.len, dbeta.len, gamma.len) == (cols, cols, cols),
            "layernorm_backward: lengths (dx {}, dout {}, x {}, mean {}, rstd {}, dgamma {}, \
             dbeta {}, gamma {}) for rows {rows}, cols {cols}",
            dx.len,
            dout.len,
            x.len,
            mean.len,
            rstd.len,
            dgamma.len,
            dbeta.len,
            gamma.len
        );
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        // Stage 1: per-block partials of Σ dout·ŝ and Σ dout, in dynamic shared memory of
        // warps·2·cols floats; fewer warps per block for rows too wide for 4.
        let mut warps = LN_BWD_WARPS;
        while warps > 1 && warps as usize * 8 * cols > self.max_smem_optin as usize {
            warps /= 2;
        }
        let smem = warps as usize * 8 * cols;
        ensure!(
            smem <= self.max_smem_optin as usize,
            "layernorm_backward: {cols} columns need {smem} bytes of shared memory, the GPU \
             allows {}",
            self.max_smem_optin
        );
        let parts = rows
            .div_ceil(warps as usize)
            .min(2 * self.sms as usize)
            .max(1);
        let partials = self.scratch(parts * 2 * cols)?;
        self.launch(
            "layernorm_backward_f32",
            (parts as u32, 1, 1),
            (32 * warps, 1, 1),
            smem as u32,
            &LayerNormBackward {
                dx: dx.device_ptr(),
                dbranch,
                partials: partials.device_ptr(),
                dout: dout.device_ptr(),
                x: x.device_ptr(),
                mean: mean.device_ptr(),
                rstd: rstd.device_ptr(),
                gamma: gamma.device_ptr(),
                rows: u32_of(rows, "rows")?,
                cols: u32_of(cols, "cols")?,
                p: dropout_p(dropout),
                seed: dropout.seed,
                stream: dropout.stream,
            },
        )?;
        // Stage 2: dgamma/dbeta += Σ over the partials (fixed order).
        let grid = (2 * cols).div_ceil(32).min(65535) as u32;
        self.launch(
            "layernorm_backward_reduce",
            (grid, 1, 1),
            (32, 32, 1),
            0,
            &LayerNormBackwardReduce {
                dgamma: dgamma.device_ptr(),
                dbeta: dbeta.device_ptr(),
                partials: partials.device_ptr(),
                parts: parts as u32,
                cols: u32_of(cols, "cols")?,
            },
        )
    }

    // ---- activations ----
    fn activation_forward(&self, out: &CudaTensor, x: &CudaTensor, act: Activation) -> Result<()> {
        ensure!(
            out.len == x.len && out.dtype == x.dtype,
            "activation_forward: out {} {} elements, x {} {}",
            out.len,
            out.dtype.name(),
            x.len,
            x.dtype.name()
        );
        let kernel = match self.stored_in_matmul_format(x, "activation_forward's x")? {
            false => "activation_forward_f32",
            true if x.dtype == Dtype::Bf16 => "activation_forward_bf16",
            true => "activation_forward_f16",
        };
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            kernel,
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &ActivationForward {
                out: out.any_ptr(),
                x: x.any_ptr(),
                n: x.len as u64,
                act: act_code(act),
            },
        )
    }

    fn activation_backward(
        &self,
        dx: &CudaTensor,
        dout: &CudaTensor,
        x: &CudaTensor,
        act: Activation,
    ) -> Result<()> {
        ensure!(
            dx.len == x.len && dout.len == x.len,
            "activation_backward: dx {}, dout {}, x {} elements",
            dx.len,
            dout.len,
            x.len
        );
        let kernel = match self.stored_in_matmul_format(x, "activation_backward's x")? {
            false => "activation_backward_f32",
            true if x.dtype == Dtype::Bf16 => "activation_backward_x_bf16",
            true => "activation_backward_x_f16",
        };
        let (dx, dout) = (dx.device_ptr(), dout.device_ptr());
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            kernel,
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &ActivationBackward {
                dx,
                dout,
                x: x.any_ptr(),
                n: x.len as u64,
                act: act_code(act),
            },
        )
    }

    fn tanh_forward(&self, out: &CudaTensor, x: &CudaTensor) -> Result<()> {
        ensure!(
            out.len == x.len,
            "tanh_forward: out {} elements, x {}",
            out.len,
            x.len
        );
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            "tanh_forward_f32",
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &TanhForward {
                out: out.device_ptr(),
                x: x.device_ptr(),
                n: x.len as u64,
            },
        )
    }

    fn tanh_backward(&self, dx: &CudaTensor, dout: &CudaTensor, y: &CudaTensor) -> Result<()> {
        ensure!(
            dx.len == y.len && dout.len == y.len,
            "tanh_backward: dx {}, dout {}, y {} elements",
            dx.len,
            dout.len,
            y.len
        );
        if y.len == 0 {
            return Ok(());
        }
        self.launch(
            "tanh_backward_f32",
            self.elementwise_grid(y.len),
            (256, 1, 1),
            0,
            &TanhBackward {
                dx: dx.device_ptr(),
                dout: dout.device_ptr(),
                y: y.device_ptr(),
                n: y.len as u64,
            },
        )
    }

    // ---- dropout ----
    fn dropout_forward(&self, out: &CudaTensor, x: &CudaTensor, d: Dropout) -> Result<()> {
        self.dropout("dropout_forward_f32", out, x, |out, x, n| DropoutForward {
            out,
            x,
            n,
            p: d.p,
            seed: d.seed,
            stream: d.stream,
        })
    }

    fn dropout_backward(&self, dx: &CudaTensor, dout: &CudaTensor, d: Dropout) -> Result<()> {
        self.dropout("dropout_backward_f32", dx, dout, |dx, dout, n| {
            DropoutBackward {
                dx,
                dout,
                n,
                p: d.p,
                seed: d.seed,
                stream: d.stream,
            }
        })
    }

    // ---- rows of sequences ----
    fn gather_first_tokens(
        &self,
        out: &CudaTensor,
        x: &CudaTensor,
        layout: &SeqLayout,
        hidden: usize,
    ) -> Result<()> {
        self.first_tokens(
            "gather_first_tokens_f32",
            (out, x),
            layout,
            hidden,
            true,
            |out, x, starts, batch, hidden| GatherFirstTokens {
                out,
                x,
                starts,
                batch,
                hidden,
            },
        )
    }

    fn scatter_first_tokens_backward(
        &self,
        dx: &CudaTensor,
        dout: &CudaTensor,
        layout: &SeqLayout,
        hidden: usize,
    ) -> Result<()> {
        self.first_tokens(
            "scatter_first_tokens_backward_f32",
            (dx, dout),
            layout,
            hidden,
            false,
            |dx, dout, starts, batch, hidden| ScatterFirstTokensBackward {
                dx,
                dout,
                starts,
                batch,
                hidden,
            },
        )
    }

    // ---- attention ----
    fn attention_forward(
        &self,
        out: &CudaTensor,
        lse: &CudaTensor,
        qkv: &CudaTensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()> {
        let AttentionDims { heads, head_dim } = dims;
        let hidden = heads * head_dim;
        // The layout first (as on the CPU): the lengths below are counted from it.
        self.check_layout(layout)?;
        let rows = layout.total_rows();
        ensure!(
            (out.len, lse.len, qkv.len) == (rows * hidden, rows * heads, rows * 3 * hidden),
            "attention_forward: lengths (out {}, lse {}, qkv {}) for {rows} rows, {heads} heads \
             of {head_dim}",
            out.len,
            lse.len,
            qkv.len
        );
        let (prefix, suffix, block_rows) = self.attention_kernels(head_dim)?;
        let s = layout.max_rows();
        if layout.batch() == 0 || s == 0 || heads == 0 {
            return Ok(());
        }
        ensure!(heads < 1 << 16, "attention is limited to 65535 heads");
        let l = self.layout(layout)?;
        let qkv = self.attention_qkv(qkv, prefix, "attention_forward")?;
        let out16 = self.attention_16_bit(out, "out", prefix, "attention_forward")?;
        self.launch(
            &format!(
                "{prefix}forward_{suffix}{}",
                if out16 { "_out16" } else { "" }
            ),
            (
                s.div_ceil(block_rows) as u32,
                heads as u32,
                layout.batch() as u32,
            ),
            (128, 1, 1),
            0,
            &AttentionForward {
                out: out.any_ptr(),
                lse: lse.device_ptr(),
                qkv: qkv.any_ptr(),
                starts: l.starts(),
                rows: l.rows(),
                valid: l.valid(),
                heads: heads as u32,
                head_dim: head_dim as u32,
                dropout_p: dropout_p(dropout),
                seed: dropout.seed,
                stream: dropout.stream,
            },
        )
    }

    fn attention_backward(
        &self,
        dqkv: &CudaTensor,
        dout: &CudaTensor,
        qkv: &CudaTensor,
        out: &CudaTensor,
        lse: &CudaTensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()> {
        let AttentionDims { heads, head_dim } = dims;
        let hidden = heads * head_dim;
        self.check_layout(layout)?;
        let rows = layout.total_rows();
        ensure!(
            (dqkv.len, dout.len, out.len, qkv.len, lse.len)
                == (
                    rows * 3 * hidden,
                    rows * hidden,
                    rows * hidden,
                    rows * 3 * hidden,
                    rows * heads
                ),
            "attention_backward: lengths (dqkv {}, dout {}, out {}, qkv {}, lse {}) for {rows} \
             rows, {heads} heads of {head_dim}",
            dqkv.len,
            dout.len,
            out.len,
            qkv.len,
            lse.len
        );
        let (prefix, suffix, block_rows) = self.attention_kernels(head_dim)?;
        let s = layout.max_rows();
        if layout.batch() == 0 || s == 0 || heads == 0 {
            return Ok(());
        }
        ensure!(heads < 1 << 16, "attention is limited to 65535 heads");
        let l = self.layout(layout)?;
        let qkv = self.attention_qkv(qkv, prefix, "attention_backward")?;
        let delta_kernel = match self.attention_16_bit(out, "out", prefix, "attention_backward")? {
            false => "attention_backward_delta_f32",
            true if out.dtype == Dtype::Bf16 => "attention_backward_delta_out_bf16",
            true => "attention_backward_delta_out_f16",
        };
        // delta[r·heads + h] = dO·o, one warp per (row, head), 8 warps per block.
        let delta = self.scratch(rows * heads)?;
        let pairs = rows * heads;
        ensure!(
            pairs.div_ceil(8) <= i32::MAX as usize,
            "attention_backward: too many rows"
        );
        self.launch(
            delta_kernel,
            (pairs.div_ceil(8) as u32, 1, 1),
            (256, 1, 1),
            0,
            &AttentionBackwardDelta {
                delta: delta.device_ptr(),
                dout: dout.device_ptr(),
                out: out.any_ptr(),
                total_rows: u32_of(rows, "rows")?,
                heads: heads as u32,
                head_dim: head_dim as u32,
            },
        )?;
        let grid = (
            s.div_ceil(block_rows) as u32,
            heads as u32,
            layout.batch() as u32,
        );
        for kind in ["dq", "dkdv"] {
            self.launch(
                &format!("{prefix}backward_{kind}_{suffix}"),
                grid,
                (128, 1, 1),
                0,
                &AttentionBackward {
                    dqkv: dqkv.device_ptr(),
                    dout: dout.device_ptr(),
                    qkv: qkv.any_ptr(),
                    lse: lse.device_ptr(),
                    delta: delta.device_ptr(),
                    starts: l.starts(),
                    rows: l.rows(),
                    valid: l.valid(),
                    heads: heads as u32,
                    head_dim: head_dim as u32,
                    dropout_p: dropout_p(dropout),
                    seed: dropout.seed,
                    stream: dropout.stream,
                },
            )?;
        }
        Ok(())
    }

    // ---- loss ----
    fn cross_entropy_forward(
        &self,
        losses: &CudaTensor,
        logits: &CudaTensor,
        labels: &CudaIds,
        classes: usize,
        smoothing: f32,
    ) -> Result<()> {
        let rows = labels.len();
        ensure!(
            (losses.len, logits.len) == (rows, rows * classes),
            "cross_entropy_forward: lengths (losses {}, logits {}) for {rows} labels of \
             {classes} classes",
            losses.len,
            logits.len
        );
        self.launch_cross_entropy("cross_entropy_forward_f32", labels, classes, || {
            Ok(CrossEntropyForward {
                losses: losses.device_ptr(),
                logits: logits.device_ptr(),
                labels: labels.device_ptr(),
                rows: u32_of(rows, "rows")?,
                classes: u32_of(classes, "classes")?,
                smoothing,
            })
        })
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &CudaTensor,
        logits: &CudaTensor,
        labels: &CudaIds,
        classes: usize,
        smoothing: f32,
        scale: f32,
    ) -> Result<()> {
        let rows = labels.len();
        ensure!(
            (dlogits.len, logits.len) == (rows * classes, rows * classes),
            "cross_entropy_backward: lengths (dlogits {}, logits {}) for {rows} labels of \
             {classes} classes",
            dlogits.len,
            logits.len
        );
        self.launch_cross_entropy("cross_entropy_backward_f32", labels, classes, || {
            Ok(CrossEntropyBackward {
                dlogits: dlogits.device_ptr(),
                logits: logits.device_ptr(),
                labels: labels.device_ptr(),
                rows: u32_of(rows, "rows")?,
                classes: u32_of(classes, "classes")?,
                smoothing,
                scale,
            })
        })
    }

    fn cross_entropy_forward_backward(
        &self,
        losses: &CudaTensor,
        dlogits: &CudaTensor,
        logits: &CudaTensor,
        labels: &CudaIds,
        classes: usize,
        smoothing: f32,
        scale: f32,
    ) -> Result<()> {
        let rows = labels.len();
        ensure!(
            (losses.len, dlogits.len, logits.len) == (rows, rows * classes, rows * classes),
            "cross_entropy_forward_backward: lengths (losses {}, dlogits {}, logits {}) for \
             {rows} labels of {classes} classes",
            losses.len,
            dlogits.len,
            logits.len
        );
        self.launch_cross_entropy(
            "cross_entropy_forward_backward_f32",
            labels,
            classes,
            || {
                Ok(CrossEntropyForwardBackward {
                    losses: losses.device_ptr(),
                    dlogits: dlogits.device_ptr(),
                    logits: logits.device_ptr(),
                    labels: labels.device_ptr(),
                    rows: u32_of(rows, "rows")?,
                    classes: u32_of(classes, "classes")?,
                    smoothing,
                    scale,
                })
            },
        )
    }

    // ---- optimizer ----
    fn sum_squares(&self, out: &CudaTensor, x: &CudaTensor) -> Result<()> {
        ensure!(out.len >= 1, "sum_squares: out is empty");
        let parts = grid_1d(x.len, 4, 1024, 2 * self.sms);
        let partials = self.scratch(parts as usize)?;
        self.launch(
            "sum_squares_partial",
            (parts, 1, 1),
            (1024, 1, 1),
            0,
            &SumSquaresPartial {
                partials: partials.device_ptr(),
                x: x.device_ptr(),
                n: x.len as u64,
            },
        )?;
        self.launch(
            "sum_squares_finalize",
            (1, 1, 1),
            (1024, 1, 1),
            0,
            &SumSquaresFinalize {
                out: out.device_ptr(),
                partials: partials.device_ptr(),
                parts,
            },
        )
    }

    fn clip_by_global_norm(&self, x: &CudaTensor, sumsq: &CudaTensor, max_norm: f32) -> Result<()> {
        ensure!(sumsq.len >= 1, "clip_by_global_norm: sumsq is empty");
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            "clip_by_global_norm",
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &ClipByGlobalNorm {
                x: x.device_ptr(),
                n: x.len as u64,
                sumsq: sumsq.device_ptr(),
                max_norm,
            },
        )
    }

    fn scale_by(&self, x: &CudaTensor, s: &CudaTensor) -> Result<()> {
        ensure!(s.len >= 1, "scale_by: the factor is empty");
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            "scale_by_device",
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &ScaleByDevice {
                x: x.device_ptr(),
                n: x.len as u64,
                s: s.device_ptr(),
            },
        )
    }

    fn unscale_and_check(
        &self,
        x: &CudaTensor,
        scale: &CudaTensor,
        found_inf: &CudaTensor,
    ) -> Result<()> {
        ensure!(
            found_inf.len >= 1 && scale.len >= 1,
            "unscale_and_check: found_inf or scale is empty"
        );
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            "unscale_and_check",
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &UnscaleAndCheck {
                grads: x.device_ptr(),
                n: x.len as u64,
                scale: scale.device_ptr(),
                found_inf: found_inf.device_ptr(),
            },
        )
    }

    fn update_loss_scale(
        &self,
        state: &CudaTensor,
        found_inf: &CudaTensor,
        growth: f32,
        backoff: f32,
        growth_interval: u32,
    ) -> Result<()> {
        ensure!(
            state.len >= 2 && found_inf.len >= 1,
            "update_loss_scale: state needs [scale, growth_tracker] and found_inf one element"
        );
        self.launch(
            "update_loss_scale",
            (1, 1, 1),
            (1, 1, 1),
            0,
            &UpdateLossScale {
                state: state.device_ptr(),
                found_inf: found_inf.device_ptr(),
                growth,
                backoff,
                growth_interval,
            },
        )
    }

    type Pending = PendingDownload;

    fn download_start(&self, t: &CudaTensor) -> Result<PendingDownload> {
        self.outside_graphs("a read-back")?;
        PendingDownload::start(self, t)
    }

    fn download_finish(&self, pending: PendingDownload) -> Result<Vec<f32>> {
        pending.finish(self)
    }

    fn adamw_update(
        &self,
        tensors: &[AdamWTensor<'_, CudaTensor>],
        step: &AdamWStep,
        skip: Option<&CudaTensor>,
    ) -> Result<()> {
        let skip = skip.map_or(0, |s| s.device_ptr());
        for t in tensors {
            ensure!(
                t.grad.len == t.param.len
                    && t.exp_avg.len == t.param.len
                    && t.exp_avg_sq.len == t.param.len,
                "adamw_update: param {}, grad {}, exp_avg {}, exp_avg_sq {} elements",
                t.param.len,
                t.grad.len,
                t.exp_avg.len,
                t.exp_avg_sq.len
            );
        }
        let views: Vec<AdamWViews> = tensors
            .iter()
            .map(|t| {
                let four = [t.param, t.grad, t.exp_avg, t.exp_avg_sq];
                AdamWViews {
                    storages: four.map(|v| Arc::as_ptr(&v.buf) as usize),
                    offsets: four.map(|v| v.offset),
                    len: t.param.len,
                    weight_decay: t.weight_decay,
                }
            })
            .collect();
        let groups = plan_adamw(&views);
        let t = i32::try_from(step.step).unwrap_or(i32::MAX);
        let step_size = (step.lr / (1.0 - step.beta1.powi(t))) as f32;
        let bc2_sqrt = ((1.0 - step.beta2.powi(t)).sqrt()) as f32;
        for g in &groups {
            // Shared groups address from the allocations' bases, the others from the views.
            let first = &tensors[g.first];
            let base = |v: &CudaTensor| {
                if g.shared {
                    v.buf.ptr
                } else {
                    v.device_ptr()
                }
            };
            // The table in optim.cu's layout: {u64 offset, u64 length, f64 weight_decay}.
            let bytes: Vec<u64> = g
                .segments
                .iter()
                .flat_map(|s| [s.offset, s.length, s.weight_decay.to_bits()])
                .collect();
            let table = self.adamw_table(bytes)?;
            self.launch(
                "adamw_update",
                (g.segments.len().min(65535) as u32, 1, 1),
                (256, 1, 1),
                0,
                &AdamWUpdate {
                    param: base(first.param),
                    grad: base(first.grad),
                    exp_avg: base(first.exp_avg),
                    exp_avg_sq: base(first.exp_avg_sq),
                    segments: table.ptr,
                    num_segments: u32_of(g.segments.len(), "segments")?,
                    lr: step.lr,
                    step_size,
                    one_minus_beta1: (1.0 - step.beta1) as f32,
                    beta2: step.beta2 as f32,
                    one_minus_beta2: (1.0 - step.beta2) as f32,
                    bias_correction2_sqrt: bc2_sqrt,
                    eps: step.eps as f32,
                    // The fp16 overflow flag (or null): the kernel then writes nothing.
                    skip,
                },
            )?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// An element-wise dropout kernel from `x` into `out`, its parameters made by `params` from
    /// (out, x, n).
    fn dropout<K: KernelParams>(
        &self,
        name: &str,
        out: &CudaTensor,
        x: &CudaTensor,
        params: impl FnOnce(u64, u64, u64) -> K,
    ) -> Result<()> {
        ensure!(
            out.len == x.len,
            "{name}: out {} elements, x {}",
            out.len,
            x.len
        );
        if x.len == 0 {
            return Ok(());
        }
        self.launch(
            name,
            self.elementwise_grid(x.len),
            (256, 1, 1),
            0,
            &params(out.device_ptr(), x.device_ptr(), x.len as u64),
        )
    }

    /// gather (`gather` true: `(a, b)` = (out[batch, hidden], x[rows, hidden])) or scatter-add
    /// backward (`(a, b)` = (dx[rows, hidden], dout[batch, hidden])), its parameters made by
    /// `params` from (a, b, starts, batch, hidden).
    fn first_tokens<K: KernelParams>(
        &self,
        name: &str,
        (a, b): (&CudaTensor, &CudaTensor),
        layout: &SeqLayout,
        hidden: usize,
        gather: bool,
        params: impl FnOnce(u64, u64, u64, u32, u32) -> K,
    ) -> Result<()> {
        let batch = layout.batch();
        let (small, big) = if gather { (a, b) } else { (b, a) };
        ensure!(
            small.len == batch * hidden,
            "{name}: {} elements for {batch} sequences of hidden {hidden}",
            small.len
        );
        for (i, &s) in layout.starts.iter().enumerate() {
            ensure!(
                (s as usize + 1) * hidden <= big.len,
                "{name}: sequence {i} starts at row {s}, past the {} rows",
                big.len / hidden.max(1)
            );
        }
        if !gather {
            // The scatter's blocks add into dx rows without atomics: one sequence per row.
            let mut starts = layout.starts.clone();
            starts.sort_unstable();
            if let Some(w) = starts.windows(2).find(|w| w[0] == w[1]) {
                bail!("{name}: two sequences start at row {}", w[0]);
            }
        }
        if batch == 0 || hidden == 0 {
            return Ok(());
        }
        let l = self.layout(layout)?;
        let block = (hidden.div_ceil(4).div_ceil(32) * 32).min(256) as u32;
        let grid = (
            hidden.div_ceil(4).div_ceil(block as usize) as u32,
            batch.min(65535) as u32,
            1,
        );
        self.launch(
            name,
            grid,
            (block, 1, 1),
            0,
            &params(
                a.device_ptr(),
                b.device_ptr(),
                l.starts(),
                u32_of(batch, "batch")?,
                u32_of(hidden, "hidden")?,
            ),
        )
    }

    /// A loss.cu kernel over `labels.len()` rows, its labels checked first: one warp per row.
    fn launch_cross_entropy<K: KernelParams>(
        &self,
        kernel: &str,
        labels: &CudaIds,
        classes: usize,
        params: impl FnOnce() -> Result<K>,
    ) -> Result<()> {
        self.check_labels(labels, classes)?;
        let rows = labels.len();
        if rows == 0 {
            return Ok(());
        }
        let grid = (rows.div_ceil(8).min(65535) as u32, 1, 1);
        self.launch(kernel, grid, (256, 1, 1), 0, &params()?)
    }

    fn check_labels(&self, labels: &CudaIds, classes: usize) -> Result<()> {
        if let Some(bad) = first_bad_label(&labels.host, classes) {
            bail!("label {bad} out of range for {classes} classes");
        }
        Ok(())
    }
}

/// Where one AdamW tensor's four views lie: their allocations (by identity), their element
/// offsets in them, the length, and the weight decay.
#[derive(Clone, Copy, Debug)]
struct AdamWViews {
    storages: [usize; 4],
    offsets: [usize; 4],
    len: usize,
    weight_decay: f64,
}

/// One `adamw_update` launch: the segment table and where its base pointers come from.
#[derive(Debug, PartialEq)]
struct AdamWGroup {
    /// The tensor whose four views give the base pointers.
    first: usize,
    /// `true`: the bases are the four allocations' starts, and segment offsets are offsets in
    /// them (every member's four views share one offset in the same four allocations).
    /// `false`: one tensor, the bases are its views, offsets start at 0.
    shared: bool,
    segments: Vec<AdamWSegment>,
}

impl PartialEq for AdamWSegment {
    fn eq(&self, o: &Self) -> bool {
        (self.offset, self.length, self.weight_decay.to_bits())
            == (o.offset, o.length, o.weight_decay.to_bits())
    }
}

/// AdamW segment tables kept on the device ([`CudaBackend::adamw_table`]).
const ADAMW_TABLES: usize = 8;

/// Elements per segment of the table (~64 Ki balances the blocks, optim.cu).
const ADAMW_CHUNK: usize = 1 << 16;

/// Groups the tensors of one AdamW step into launches. Tensors whose four views lie at one
/// common offset of the same four allocations (the flat parameter, gradient and moment
/// buffers, as the optimizer passes them) share one launch, with segment offsets relative to
/// the allocations' starts; any other tensor gets a launch of its own, from its own views.
/// Empty tensors are left out; long ones are split into segments of [`ADAMW_CHUNK`].
fn plan_adamw(tensors: &[AdamWViews]) -> Vec<AdamWGroup> {
    let mut groups: Vec<AdamWGroup> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        if t.len == 0 {
            continue;
        }
        let shared = t.offsets.iter().all(|&o| o == t.offsets[0]);
        let at = if shared { t.offsets[0] } else { 0 };
        let existing = if shared {
            groups
                .iter()
                .position(|g| g.shared && tensors[g.first].storages == t.storages)
        } else {
            None
        };
        let g = match existing {
            Some(g) => g,
            None => {
                groups.push(AdamWGroup {
                    first: i,
                    shared,
                    segments: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let mut done = 0;
        while done < t.len {
            let len = ADAMW_CHUNK.min(t.len - done);
            groups[g].segments.push(AdamWSegment {
                offset: (at + done) as u64,
                length: len as u64,
                weight_decay: t.weight_decay,
            });
            done += len;
        }
    }
    groups
}

/// The first label that is neither a class nor [`IGNORE_LABEL`] (a padding sequence's: the
/// kernels give it loss and gradient 0).
fn first_bad_label(labels: &[u32], classes: usize) -> Option<u32> {
    labels
        .iter()
        .copied()
        .find(|&l| l as usize >= classes && l != IGNORE_LABEL)
}

/// The kernels' `act` code: the order of [`Activation`].
fn act_code(act: Activation) -> i32 {
    match act {
        Activation::GeluErf => 0,
        Activation::GeluTanh => 1,
        Activation::Relu => 2,
    }
}

/// The dropout probability the attention and LayerNorm kernels get (0: none).
fn dropout_p(d: Dropout) -> f32 {
    if d.is_active() {
        d.p
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, length: u64, weight_decay: f64) -> AdamWSegment {
        AdamWSegment {
            offset,
            length,
            weight_decay,
        }
    }

    fn views(storages: [usize; 4], offsets: [usize; 4], len: usize, wd: f64) -> AdamWViews {
        AdamWViews {
            storages,
            offsets,
            len,
            weight_decay: wd,
        }
    }

    #[test]
    fn adamw_segments_of_flat_buffers_share_one_launch() {
        let flat = [1, 2, 3, 4];
        let plan = plan_adamw(&[
            views(flat, [0; 4], 7, 0.01),
            views(flat, [7; 4], 0, 0.0),
            views(flat, [7; 4], 13, 0.0),
            views(flat, [20; 4], ADAMW_CHUNK + 5, 0.01),
        ]);
        assert_eq!(
            plan,
            vec![AdamWGroup {
                first: 0,
                shared: true,
                segments: vec![
                    seg(0, 7, 0.01),
                    seg(7, 13, 0.0),
                    seg(20, ADAMW_CHUNK as u64, 0.01),
                    seg(20 + ADAMW_CHUNK as u64, 5, 0.01),
                ],
            }]
        );
    }

    #[test]
    fn adamw_other_tensors_launch_on_their_own() {
        let plan = plan_adamw(&[
            views([1, 2, 3, 4], [5; 4], 10, 0.1),
            // Same storages, different offsets: its own views as bases.
            views([9, 9, 9, 9], [0, 100, 200, 300], 33, 0.0),
            // Other allocations, equal offsets: a shared group of its own.
            views([5, 6, 7, 8], [0; 4], 4, 0.0),
            // Back to the first group.
            views([1, 2, 3, 4], [15; 4], 2, 0.1),
        ]);
        assert_eq!(
            plan,
            vec![
                AdamWGroup {
                    first: 0,
                    shared: true,
                    segments: vec![seg(5, 10, 0.1), seg(15, 2, 0.1)],
                },
                AdamWGroup {
                    first: 1,
                    shared: false,
                    segments: vec![seg(0, 33, 0.0)],
                },
                AdamWGroup {
                    first: 2,
                    shared: true,
                    segments: vec![seg(0, 4, 0.0)],
                },
            ]
        );
    }

    #[test]
    fn labels_are_classes_or_ignored() {
        assert_eq!(first_bad_label(&[0, 1, IGNORE_LABEL, 2], 3), None);
        assert_eq!(first_bad_label(&[0, 3, IGNORE_LABEL - 1], 3), Some(3));
        assert_eq!(
            first_bad_label(&[IGNORE_LABEL - 1], 3),
            Some(IGNORE_LABEL - 1)
        );
    }

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CudaBackend>();
        send_sync::<CudaTensor>();
        send_sync::<CudaIds>();
    }

    #[test]
    fn launch_grids() {
        assert_eq!(grid_1d(0, 4, 256, 100), 1);
        assert_eq!(grid_1d(1, 4, 256, 100), 1);
        assert_eq!(grid_1d(1024, 4, 256, 100), 1);
        assert_eq!(grid_1d(1025, 4, 256, 100), 2);
        assert_eq!(grid_1d(1 << 30, 4, 256, 100), 100);
        assert_eq!(CudaBackend::attention_variant(32).unwrap(), ("d32", 64));
        assert_eq!(CudaBackend::attention_variant(64).unwrap(), ("d64", 32));
        assert_eq!(CudaBackend::attention_variant(5).unwrap(), ("generic", 16));
        assert_eq!(
            CudaBackend::attention_variant(128).unwrap(),
            ("generic", 16)
        );
        assert!(CudaBackend::attention_variant(0).is_err());
        assert!(CudaBackend::attention_variant(129).is_err());
    }
}
