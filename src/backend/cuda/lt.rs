//! cuBLASLt for the dense layers' forward: `out = x·wᵀ + bias` as one GEMM whose epilogue adds
//! the bias (`CUBLASLT_EPILOGUE_BIAS`).
//!
//! Why: with plain cuBLAS the bias takes a rank-1 GEMM that writes `out`, and the product a
//! second GEMM that reads `out` back (beta 1) and writes it again: two extra passes over every
//! dense layer's output (at BERT-base, batch 32, seq 128: ~2.7 GB a step). The epilogue adds the
//! fp32 bias to the fp32 accumulator before the one store, `out = fl(Σ + b)`, the same rounding
//! as the two-GEMM path (`fl(Σ + 1·b)`), so the CPU reference is unchanged.
//! BERT's erf GELU is not fused here: cuBLASLt's GELU epilogues are the tanh form.
//!
//! Layout (column-major, as the module header of `backend.rs` derives it): `D(n×rows) =
//! op(A)·B + bias` with `A = w` (k×n, ld k, transposed), `B = x` (k×rows, ld k), `C = D = out`
//! (n×rows, ld n, fp32 or 16-bit), beta 0, the bias `n` fp32 values broadcast along D's
//! columns. A 16-bit D (an activation stored in the GEMMs' format, `Dtype`) gets the fp32 sum
//! rounded once, `fl16(Σ + b)`, as the CPU reference computes it: the bias stays fp32
//! (`CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE`, which would otherwise default to D's type and round
//! the bias first), and split-K partial sums stay fp32 (the reduction-scheme preference). The
//! documentation lists an fp32 bias beside a 16-bit D only for other kernels (IMMA, fp8); where
//! the heuristic refuses it, the caller runs this GEMM with an fp32 D into scratch and casts.
//!
//! Plans (descriptors, layouts and the heuristic's algorithm) are made once per shape, operand
//! types and pointer alignments, and kept; only the bias pointer is set per call. The heuristic
//! is told the operands' real alignments, since views into the flat parameter buffer are not
//! always 256-byte aligned. Where no algorithm is offered, or the bias is not 16-byte aligned,
//! [`Lt::matmul_bias`] says so and the caller takes the two-GEMM path.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use anyhow::{bail, Result};
use cudarc::cublaslt::sys as lt;

/// cublasOperation_t's values (int32 attributes; cudarc's cuBLASLt bindings lack the enum).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

/// Bytes of workspace cuBLASLt may use (NVIDIA's recommendation for Hopper, 32 MiB).
pub const WORKSPACE_BYTES: usize = 32 << 20;

fn check(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("{what}: {s:?}");
    }
    Ok(())
}

/// The largest power of two (≤ 256) dividing `ptr`: the alignment the heuristic may assume.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

/// One GEMM's operands, as `matmul_bias` takes them (addresses and data types).
#[derive(Clone, Copy, Debug)]
pub struct BiasGemm {
    /// `w` (k×n column-major, read transposed).
    pub a: u64,
    pub a_type: lt::cudaDataType,
    /// `x` (k×rows column-major).
    pub b: u64,
    pub b_type: lt::cudaDataType,
    /// `bias` (n fp32).
    pub bias: u64,
    /// `out` (n×rows column-major).
    pub d: u64,
    /// fp32, or the 16-bit type of A and B.
    pub d_type: lt::cudaDataType,
    /// (n, rows, k).
    pub mnk: (usize, usize, usize),
    pub compute: lt::cublasComputeType_t,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    mnk: (usize, usize, usize),
    /// A, B and D.
    types: (i32, i32, i32),
    compute: i32,
    /// A, B, D and the bias (the heuristic reads the bias pointer's alignment from its value).
    align: [u32; 4],
}

/// Plans kept at most (packed batches have a row count per batch); beyond, the cache restarts.
const MAX_PLANS: usize = 512;

/// Whether a bias at `ptr` can take the epilogue path (the 16-byte alignment of a float4 read).
pub fn bias_fits(ptr: u64) -> bool {
    ptr % 16 == 0
}

/// Descriptors and the chosen algorithm of one shape; destroyed on drop.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 3],
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created once by Plan::new, destroyed once.
        unsafe {
            lt::cublasLtMatmulDescDestroy(self.desc);
            for l in self.layouts {
                lt::cublasLtMatrixLayoutDestroy(l);
            }
        }
    }
}

struct State {
    handle: lt::cublasLtHandle_t,
    /// `None`: no algorithm for that key.
    plans: HashMap<PlanKey, Option<Plan>>,
    /// GEMMs queued through the epilogue (what the GPU tests check was taken).
    queued: u64,
}

// SAFETY: the handle and descriptors are only used under `Lt`'s Mutex, one thread at a time.
unsafe impl Send for State {}

impl Drop for State {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created by cublasLtCreate, destroyed once, after its plans.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}

/// A cuBLASLt handle with its workspace and plans, for one stream.
pub struct Lt {
    state: Mutex<State>,
    workspace: u64,
}

impl Lt {
    /// A handle using `workspace` (a device allocation of [`WORKSPACE_BYTES`] the caller keeps
    /// alive as long as this).
    pub fn new(workspace: u64) -> Result<Self> {
        let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: an out-parameter.
        check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
        Ok(Lt {
            state: Mutex::new(State {
                handle,
                plans: HashMap::new(),
                queued: 0,
            }),
            workspace,
        })
    }

    /// Counts `n` epilogue GEMMs queued by replaying a CUDA graph.
    pub fn count_replayed(&self, n: u64) {
        self.state.lock().unwrap().queued += n;
    }

    /// How many GEMMs took the epilogue path so far.
    pub fn queued(&self) -> u64 {
        self.state.lock().unwrap().queued
    }

    /// Queues `D = op(A)·B + bias` on `stream`; `Ok(false)` (nothing queued) where the bias does
    /// not [`bias_fits`], D is a single row or column (cuBLASLt's heuristic refuses those), or
    /// cuBLASLt offers no algorithm or refuses the call (the plan is then remembered as refused).
    pub fn matmul_bias(&self, g: &BiasGemm, stream: lt::cudaStream_t) -> Result<bool> {
        if !bias_fits(g.bias) || g.mnk.0 <= 1 || g.mnk.1 <= 1 {
            return Ok(false);
        }
        let key = PlanKey {
            mnk: g.mnk,
            types: (g.a_type as i32, g.b_type as i32, g.d_type as i32),
            compute: g.compute as i32,
            align: [
                alignment(g.a),
                alignment(g.b),
                alignment(g.d),
                alignment(g.bias),
            ],
        };
        let mut state = self.state.lock().unwrap();
        let handle = state.handle;
        if state.plans.len() >= MAX_PLANS && !state.plans.contains_key(&key) {
            state.plans.clear();
        }
        let plan = match state.plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(handle, g, key.align)?),
        };
        let Some(plan) = plan.as_ref() else {
            return Ok(false);
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the descriptors are live (plan), the pointers address the shapes the plan was
        // made for (checked by the caller), and the workspace is WORKSPACE_BYTES long.
        let status = unsafe {
            set_desc(
                plan.desc,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &g.bias,
            )?;
            lt::cublasLtMatmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                plan.layouts[0],
                g.b as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                g.d as *const c_void,
                plan.layouts[2],
                g.d as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        };
        match status {
            lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {
                state.queued += 1;
                Ok(true)
            }
            // Refused before anything was queued: the two-GEMM path does it, from now on.
            lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
            | lt::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE => {
                state.plans.insert(key, None);
                Ok(false)
            }
            s => bail!(
                "cublasLtMatmul ({}×{}×{}): {s:?}",
                g.mnk.0,
                g.mnk.1,
                g.mnk.2
            ),
        }
    }
}

/// Sets one matmul-descriptor attribute from a value of its documented type.
///
/// # Safety
/// `desc` is live and `T` is the attribute's type.
unsafe fn set_desc<T>(
    desc: lt::cublasLtMatmulDesc_t,
    attr: lt::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    check(
        "cublasLtMatmulDescSetAttribute",
        lt::cublasLtMatmulDescSetAttribute(
            desc,
            attr,
            v as *const T as *const c_void,
            size_of::<T>(),
        ),
    )
}

impl Plan {
    /// `None` where the heuristic offers no algorithm or refuses the problem (whatever its
    /// status: a refusal only sends the GEMM down the two-GEMM path).
    fn new(handle: lt::cublasLtHandle_t, g: &BiasGemm, align: [u32; 4]) -> Result<Option<Plan>> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        let (m, n, k) = (g.mnk.0 as u64, g.mnk.1 as u64, g.mnk.2 as u64);
        let mut desc: lt::cublasLtMatmulDesc_t = std::ptr::null_mut();
        // SAFETY: out-parameters and attributes of their documented types (int32 operations,
        // uint32 epilogue).
        unsafe {
            check(
                "cublasLtMatmulDescCreate",
                lt::cublasLtMatmulDescCreate(&mut desc, g.compute, lt::cudaDataType::CUDA_R_32F),
            )?;
        }
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: a plain-data struct, overwritten by the heuristic before use.
            algo: unsafe { std::mem::zeroed() },
        };
        unsafe {
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &CUBLAS_OP_T)?;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &CUBLAS_OP_N)?;
            set_desc(
                plan.desc,
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &(lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32),
            )?;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias)?;
            // An int32 cudaDataType_t; the default (D's type) would round the bias first. A
            // library that refuses it leaves the GEMM to the caller's path.
            if g.d_type != lt::cudaDataType::CUDA_R_32F
                && set_desc(
                    plan.desc,
                    D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &(lt::cudaDataType::CUDA_R_32F as i32),
                )
                .is_err()
            {
                return Ok(None);
            }
            let shapes = [
                (g.a_type, k, m, k),
                (g.b_type, k, n, k),
                (g.d_type, m, n, m),
            ];
            for (slot, (ty, rows, cols, ld)) in plan.layouts.iter_mut().zip(shapes) {
                check(
                    "cublasLtMatrixLayoutCreate",
                    lt::cublasLtMatrixLayoutCreate(slot, ty, rows, cols, ld.max(1) as i64),
                )?;
            }
        }
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: out-parameter; attributes of their documented types (uint64 workspace, uint32
        // alignments); the preference is destroyed below on every path.
        unsafe {
            check(
                "cublasLtMatmulPreferenceCreate",
                lt::cublasLtMatmulPreferenceCreate(&mut pref),
            )?;
        }
        let found = (|| -> Result<i32> {
            let set = |attr: P, v: *const c_void, size: usize| {
                // SAFETY: see above.
                check("cublasLtMatmulPreferenceSetAttribute", unsafe {
                    lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, v, size)
                })
            };
            let ws = WORKSPACE_BYTES as u64;
            set(
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as _,
                8,
            )?;
            let attrs = [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            let aligns = [align[0], align[1], align[2], align[2]];
            for (attr, a) in attrs.into_iter().zip(aligns) {
                set(attr, &a as *const u32 as _, 4)?;
            }
            if g.d_type != lt::cudaDataType::CUDA_R_32F {
                // A split-K sum reduced in D's type (INPLACE, OUTPUT_TYPE) would round a 16-bit
                // output more than once: only no split or fp32 partial sums.
                // (NONE, 0, is always allowed.)
                let mask =
                    lt::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
                set(
                    P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    &mask as *const u32 as _,
                    4,
                )?;
            }
            let mut result: lt::cublasLtMatmulHeuristicResult_t =
                // SAFETY: plain data, written by the heuristic.
                unsafe { std::mem::zeroed() };
            let mut count = 0i32;
            // SAFETY: live descriptors; room for one result.
            let status = unsafe {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    1,
                    &mut result,
                    &mut count,
                )
            };
            if status != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Ok(0);
            }
            if count > 0 && result.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                plan.algo = result.algo;
                Ok(count)
            } else {
                Ok(0)
            }
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            lt::cublasLtMatmulPreferenceDestroy(pref);
        }
        Ok((found? > 0).then_some(plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignments_are_powers_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0104), 4);
        assert_eq!(alignment(0x7f00_0000_0108), 8);
        assert_eq!(alignment(0x7f00_0000_0110), 16);
        assert_eq!(alignment(0x7f00_0000_0180), 128);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
    }
}
