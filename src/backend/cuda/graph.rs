//! CUDA graphs for the training step: capture once per batch shape, replay with patched
//! arguments.
//!
//! # Why patching, and not device-side scalars
//! A step's device work is the same sequence of kernels and GEMMs at every step of one batch
//! shape; what changes from step to step is a handful of kernel arguments passed by value or by
//! address: the dropout streams (they carry the step number), the token ids, labels and
//! sequence layouts of the new batch (uploaded to new addresses before the step), the loss-scale
//! factor's address stays, the learning rate does not enter (AdamW runs outside the graph). So
//! the host code of the step is run unchanged in one of three modes:
//! - **eager**: every op is queued as usual (the first time a batch shape is seen: it fills the
//!   caches the capture must find full — activation buffers, cuBLASLt plans, the ones vector);
//! - **capture** (the second time): the stream is captured (`cuStreamBeginCapture`), each kernel
//!   launch's node and arguments are written on a [`Tape`] along with every allocation and
//!   library call, and the graph is instantiated and launched;
//! - **replay** (every later time): nothing is queued while the host code runs; each op is
//!   matched against the tape ([`Replay`]): a kernel whose arguments differ gets its node's
//!   parameters replaced (`cuGraphExecKernelNodeSetParams`), an allocation returns the address
//!   the graph's allocation node has (fixed for the life of the executable graph), and a library
//!   call (cuBLAS, cuBLASLt, memset, copy) must be the same call. Then the graph is launched.
//!
//! Anything else — a different kernel, a different GEMM, a host copy or a read-back inside the
//! region — is a [`Mismatch`]: the replay is dropped before anything was queued, the region runs
//! eagerly, and the shape is captured again on its next step. So a step can never run with
//! stale arguments: the host computes every argument every time, and the tape only decides
//! which of them need sending.
//!
//! The region's kernels need no change, and the CPU backend (which has no graphs) runs the same
//! host code. Per replay the host cost is the step's Rust code plus one `SetParams` per changed
//! kernel (the dropout and attention launches of each layer) and one `cuGraphLaunch`, against
//! one `cuLaunchKernel` per kernel eagerly; the device runs the step without launch gaps.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;

use anyhow::{anyhow, Result};
use cudarc::driver::sys as dsys;

/// A kernel argument, passed by address to `cuLaunchKernel` (and to a graph node's update).
/// Equality is bitwise, so a NaN argument equals itself and `-0.0` differs from `0.0`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg {
    /// A device pointer (0: null).
    P(u64),
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl Arg {
    pub(super) fn addr(&self) -> *mut c_void {
        match self {
            Arg::P(v) | Arg::U64(v) => v as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
            Arg::F64(v) => v as *const f64 as *mut c_void,
        }
    }

    /// The kind and the bits, for bitwise comparison.
    fn bits(&self) -> (u8, u64) {
        match *self {
            Arg::P(v) => (0, v),
            Arg::U32(v) => (1, v as u64),
            Arg::I32(v) => (2, v as u32 as u64),
            Arg::U64(v) => (3, v),
            Arg::F32(v) => (4, v.to_bits() as u64),
            Arg::F64(v) => (5, v.to_bits()),
        }
    }
}

impl PartialEq for Arg {
    fn eq(&self, other: &Self) -> bool {
        self.bits() == other.bits()
    }
}

/// One kernel launch: the function (its `CUfunction` handle as an integer), its geometry and
/// its arguments.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Launch {
    pub func: usize,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
    pub args: Vec<Arg>,
}

/// What the region did, in order.
#[derive(Clone, Debug, PartialEq)]
enum Op {
    /// A kernel launch and the graph node it became (`CUgraphNode` as an integer).
    Kernel { launch: Launch, node: usize },
    /// A stream-ordered allocation of `bytes` and the address it got.
    Alloc { bytes: usize, ptr: u64 },
    /// A call queued by a library or a driver memset/copy, identified by what it was called
    /// with, and the value it returned to the host (cuBLASLt: whether it took the call).
    Call {
        fingerprint: Vec<u64>,
        returned: u64,
    },
}

/// The ops of one captured region.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Tape {
    ops: Vec<Op>,
}

/// The first word of a cuBLASLt call's fingerprint (it returns 1 when cuBLASLt took it).
pub(super) const LT_CALL: u64 = 2;

impl Tape {
    /// How many calls of the kind `tag` (their fingerprint's first word) returned `returned`.
    pub fn calls_returning(&self, tag: u64, returned: u64) -> u64 {
        self.ops
            .iter()
            .filter(|o| {
                matches!(o, Op::Call { fingerprint, returned: r }
                    if fingerprint.first() == Some(&tag) && *r == returned)
            })
            .count() as u64
    }

    pub fn kernel(&mut self, launch: Launch, node: usize) {
        self.ops.push(Op::Kernel { launch, node });
    }
    pub fn alloc(&mut self, bytes: usize, ptr: u64) {
        self.ops.push(Op::Alloc { bytes, ptr });
    }
    pub fn call(&mut self, fingerprint: Vec<u64>, returned: u64) {
        self.ops.push(Op::Call {
            fingerprint,
            returned,
        });
    }
}

/// A replayed region that differs from its tape: the graph cannot stand for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Position in the tape.
    pub at: usize,
    pub what: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the step differs from its CUDA graph at op {}: {}",
            self.at, self.what
        )
    }
}

impl std::error::Error for Mismatch {}

/// A node whose parameters must be replaced before the next launch.
#[derive(Debug, PartialEq)]
pub(super) struct Patch {
    pub node: usize,
    pub launch: Launch,
}

/// Matching a region's ops against its tape (see the module header).
pub(super) struct Replay {
    tape: Tape,
    at: usize,
    patches: Vec<Patch>,
}

impl Replay {
    pub fn new(tape: Tape) -> Self {
        Replay {
            tape,
            at: 0,
            patches: Vec::new(),
        }
    }

    fn next(&mut self, what: &str) -> Result<&mut Op, Mismatch> {
        let at = self.at;
        self.at += 1;
        self.tape.ops.get_mut(at).ok_or_else(|| Mismatch {
            at,
            what: format!("{what} past the end of the recorded step"),
        })
    }

    /// A kernel launch: the same function and block shape as recorded (the graph's node keeps
    /// its function); new arguments or grid make a patch.
    pub fn kernel(&mut self, launch: Launch) -> Result<(), Mismatch> {
        let at = self.at;
        let Op::Kernel {
            launch: recorded,
            node,
        } = self.next("a kernel launch")?
        else {
            return Err(Mismatch {
                at,
                what: "a kernel launch where something else was recorded".into(),
            });
        };
        if recorded.func != launch.func {
            return Err(Mismatch {
                at,
                what: "another kernel".into(),
            });
        }
        if recorded.args.len() != launch.args.len() {
            return Err(Mismatch {
                at,
                what: "a kernel with another argument count".into(),
            });
        }
        if *recorded != launch {
            let node = *node;
            *recorded = launch.clone();
            self.patches.push(Patch { node, launch });
        }
        Ok(())
    }

    /// An allocation of `bytes`: the address the graph's allocation node has.
    pub fn alloc(&mut self, bytes: usize) -> Result<u64, Mismatch> {
        let at = self.at;
        match self.next("an allocation")? {
            Op::Alloc { bytes: b, ptr } if *b == bytes => Ok(*ptr),
            Op::Alloc { bytes: b, .. } => Err(Mismatch {
                at,
                what: format!("an allocation of {bytes} bytes where {b} were recorded"),
            }),
            _ => Err(Mismatch {
                at,
                what: "an allocation where something else was recorded".into(),
            }),
        }
    }

    /// A library call or a memset/copy: must be the recorded one; returns what it returned.
    pub fn call(&mut self, fingerprint: &[u64]) -> Result<u64, Mismatch> {
        let at = self.at;
        match self.next("a library call")? {
            Op::Call {
                fingerprint: f,
                returned,
            } if f.as_slice() == fingerprint => Ok(*returned),
            Op::Call { .. } => Err(Mismatch {
                at,
                what: "a library call with other operands or shapes".into(),
            }),
            _ => Err(Mismatch {
                at,
                what: "a library call where something else was recorded".into(),
            }),
        }
    }

    /// The patches, once every recorded op was met; the tape now holds the new arguments.
    pub fn finish(self) -> Result<(Tape, Vec<Patch>), Mismatch> {
        if self.at != self.tape.ops.len() {
            return Err(Mismatch {
                at: self.at,
                what: format!(
                    "the step ended after {} of the {} recorded ops",
                    self.at,
                    self.tape.ops.len()
                ),
            });
        }
        Ok((self.tape, self.patches))
    }
}

/// How many batch shapes keep a graph at once (each holds its scratch memory while it lives).
pub(super) const MAX_GRAPHS: usize = 32;

/// Replays of one key given up for a [`Mismatch`] before it is run eagerly for good.
pub(super) const MAX_MISMATCHES: u32 = 8;

/// What is known of one region key; the count is of its replays given up so far.
pub(super) enum Entry<G> {
    /// Ran eagerly: the caches it needs are full; capture it next time.
    Seen(u32),
    /// Captured: replay it.
    Ready(G, Tape, u32),
    /// Could not be captured (named in the one notice printed): always eager.
    Failed,
}

/// Region keys and their graphs, least recently used first out once [`MAX_GRAPHS`] are held.
pub(super) struct GraphCache<G> {
    entries: HashMap<Vec<u64>, (Entry<G>, u64)>,
    clock: u64,
}

impl<G> Default for GraphCache<G> {
    fn default() -> Self {
        GraphCache {
            entries: HashMap::new(),
            clock: 0,
        }
    }
}

impl<G> GraphCache<G> {
    /// Takes the key's entry out (to capture or replay it); `None` the first time.
    pub fn take(&mut self, key: &[u64]) -> Option<Entry<G>> {
        self.entries.remove(key).map(|(e, _)| e)
    }

    /// Puts an entry back as the most recently used, dropping the least recently used graph
    /// when one too many are held.
    pub fn put(&mut self, key: Vec<u64>, entry: Entry<G>) {
        self.clock += 1;
        self.entries.insert(key, (entry, self.clock));
        let ready = |e: &Entry<G>| matches!(e, Entry::Ready(..));
        if self.entries.values().filter(|(e, _)| ready(e)).count() > MAX_GRAPHS {
            let oldest = self
                .entries
                .iter()
                .filter(|(_, (e, _))| ready(e))
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                // Back to `Seen`: captured again if it comes back.
                self.entries.insert(k, (Entry::Seen(0), 0));
            }
        }
    }

    #[cfg(test)]
    fn graphs(&self) -> usize {
        self.entries
            .values()
            .filter(|(e, _)| matches!(e, Entry::Ready(..)))
            .count()
    }
}

/// Counts of what the graphs did, for tests and the bench report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Regions captured and launched.
    pub captures: u64,
    /// Regions launched from a graph captured earlier.
    pub replays: u64,
    /// Kernel nodes whose parameters were replaced before a replay.
    pub patched_nodes: u64,
    /// Replays given up for a [`Mismatch`] (run eagerly, captured again next time).
    pub mismatches: u64,
    /// Regions that could not be captured (run eagerly from then on).
    pub failures: u64,
}

// ---- the driver side ----

/// The driver functions graphs need beyond the backend's own (checked when graphs are asked
/// for: a driver without them runs without graphs).
pub(super) const GRAPH_SYMBOLS: &[&str] = &[
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuStreamGetCaptureInfo_v3",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecKernelNodeSetParams_v2",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    "cuDeviceGetGraphMemAttribute",
    "cuDeviceSetGraphMemAttribute",
    "cuMemPoolTrimTo",
];

fn check(what: &str, r: dsys::CUresult) -> Result<()> {
    match r {
        dsys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(anyhow!("{what}: {e:?}")),
    }
}

/// An instantiated graph and the graph it was made from, destroyed on drop (an executable graph
/// still running is freed by the driver once it completes).
pub(super) struct ExecGraph {
    graph: dsys::CUgraph,
    exec: dsys::CUgraphExec,
}

// SAFETY: the handles are only used under the backend's Mutex, one thread at a time.
unsafe impl Send for ExecGraph {}

impl Drop for ExecGraph {
    fn drop(&mut self) {
        // SAFETY: created once by `end_capture`, destroyed once.
        unsafe {
            dsys::cuGraphExecDestroy(self.exec);
            dsys::cuGraphDestroy(self.graph);
        }
    }
}

/// Starts capturing `stream`. Thread-local mode: only this thread's calls that are illegal
/// during capture (a synchronization, a synchronous allocation) break it.
pub(super) fn begin_capture(stream: dsys::CUstream) -> Result<()> {
    // SAFETY: a live stream, not capturing.
    check("cuStreamBeginCapture", unsafe {
        dsys::cuStreamBeginCapture_v2(
            stream,
            dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
    })
}

/// The node the last op captured on `stream` became (the stream's one dependency now).
pub(super) fn last_captured_node(stream: dsys::CUstream) -> Result<usize> {
    let mut status = dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut id: dsys::cuuint64_t = 0;
    let mut graph: dsys::CUgraph = std::ptr::null_mut();
    let mut deps: *const dsys::CUgraphNode = std::ptr::null();
    let mut edges: *const dsys::CUgraphEdgeData = std::ptr::null();
    let mut n: usize = 0;
    // SAFETY: out-parameters; `deps` points into the driver's memory, valid until the next
    // capture call on this stream, and is read at once.
    check("cuStreamGetCaptureInfo", unsafe {
        dsys::cuStreamGetCaptureInfo_v3(
            stream,
            &mut status,
            &mut id,
            &mut graph,
            &mut deps,
            &mut edges,
            &mut n,
        )
    })?;
    if status != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
        return Err(anyhow!("the stream stopped capturing ({status:?})"));
    }
    if n != 1 || deps.is_null() {
        return Err(anyhow!(
            "a captured launch left {n} dependencies (one expected)"
        ));
    }
    // SAFETY: `deps` holds `n` = 1 nodes.
    Ok(unsafe { *deps } as usize)
}

/// Ends the capture of `stream` (always, also after a failed region, so the stream is usable
/// again) and instantiates the graph when `keep`.
pub(super) fn end_capture(stream: dsys::CUstream, keep: bool) -> Result<Option<ExecGraph>> {
    let mut graph: dsys::CUgraph = std::ptr::null_mut();
    // SAFETY: the stream is capturing (begun by `begin_capture`); out-parameter.
    let ended = check("cuStreamEndCapture", unsafe {
        dsys::cuStreamEndCapture(stream, &mut graph)
    });
    if !keep || ended.is_err() {
        if !graph.is_null() {
            // SAFETY: returned by cuStreamEndCapture, destroyed once.
            unsafe { dsys::cuGraphDestroy(graph) };
        }
        return ended.map(|_| None);
    }
    let mut exec: dsys::CUgraphExec = std::ptr::null_mut();
    // SAFETY: a complete graph; out-parameter.
    let made = check("cuGraphInstantiate", unsafe {
        dsys::cuGraphInstantiateWithFlags(&mut exec, graph, 0)
    });
    if let Err(e) = made {
        // SAFETY: as above.
        unsafe { dsys::cuGraphDestroy(graph) };
        return Err(e);
    }
    Ok(Some(ExecGraph { graph, exec }))
}

impl ExecGraph {
    /// Replaces the parameters of the kernel nodes of `patches` (taking effect from the next
    /// launch, not touching one in flight).
    pub fn patch(&self, patches: &[Patch]) -> Result<()> {
        for p in patches {
            let mut params: Vec<*mut c_void> = p.launch.args.iter().map(Arg::addr).collect();
            let node = dsys::CUDA_KERNEL_NODE_PARAMS {
                func: p.launch.func as dsys::CUfunction,
                gridDimX: p.launch.grid.0,
                gridDimY: p.launch.grid.1,
                gridDimZ: p.launch.grid.2,
                blockDimX: p.launch.block.0,
                blockDimY: p.launch.block.1,
                blockDimZ: p.launch.block.2,
                sharedMemBytes: p.launch.smem,
                kernelParams: params.as_mut_ptr(),
                extra: std::ptr::null_mut(),
                // Only read when `func` is null; the current context.
                kern: std::ptr::null_mut(),
                ctx: std::ptr::null_mut(),
            };
            // SAFETY: a kernel node of this graph (recorded at capture) with the same function;
            // the arguments live until the call returns (it copies them).
            check("cuGraphExecKernelNodeSetParams", unsafe {
                dsys::cuGraphExecKernelNodeSetParams_v2(
                    self.exec,
                    p.node as dsys::CUgraphNode,
                    &node,
                )
            })?;
        }
        Ok(())
    }

    /// Queues the graph on `stream`.
    pub fn launch(&self, stream: dsys::CUstream) -> Result<()> {
        // SAFETY: an instantiated graph and a live stream of its context.
        check("cuGraphLaunch", unsafe {
            dsys::cuGraphLaunch(self.exec, stream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(func: usize, args: Vec<Arg>) -> Launch {
        Launch {
            func,
            grid: (4, 1, 1),
            block: (256, 1, 1),
            smem: 0,
            args,
        }
    }

    /// A step of an allocation, two kernels and a GEMM, as recorded.
    fn recorded() -> Tape {
        let mut t = Tape::default();
        t.alloc(1024, 0x7000);
        t.kernel(launch(1, vec![Arg::P(0x7000), Arg::U64(5 << 20)]), 101);
        t.call(vec![9, 0x7000, 64, 64, 64], 1);
        t.kernel(launch(2, vec![Arg::F32(0.1), Arg::P(0x8000)]), 102);
        t
    }

    #[test]
    fn the_same_step_replays_without_patches() {
        let mut r = Replay::new(recorded());
        assert_eq!(r.alloc(1024), Ok(0x7000));
        r.kernel(launch(1, vec![Arg::P(0x7000), Arg::U64(5 << 20)]))
            .unwrap();
        assert_eq!(r.call(&[9, 0x7000, 64, 64, 64]), Ok(1));
        r.kernel(launch(2, vec![Arg::F32(0.1), Arg::P(0x8000)]))
            .unwrap();
        let (tape, patches) = r.finish().unwrap();
        assert!(patches.is_empty());
        assert_eq!(tape, recorded());
    }

    #[test]
    fn changed_arguments_and_grids_patch_their_nodes_and_the_tape() {
        let mut r = Replay::new(recorded());
        r.alloc(1024).unwrap();
        // The next step's dropout stream.
        let seed = launch(1, vec![Arg::P(0x7000), Arg::U64(6 << 20)]);
        r.kernel(seed.clone()).unwrap();
        r.call(&[9, 0x7000, 64, 64, 64]).unwrap();
        // A new batch's address and a wider grid.
        let mut moved = launch(2, vec![Arg::F32(0.1), Arg::P(0x9000)]);
        moved.grid = (8, 1, 1);
        r.kernel(moved.clone()).unwrap();
        let (tape, patches) = r.finish().unwrap();
        assert_eq!(
            patches,
            vec![
                Patch {
                    node: 101,
                    launch: seed.clone()
                },
                Patch {
                    node: 102,
                    launch: moved.clone()
                }
            ]
        );
        // The tape now holds what the nodes hold: the same step again needs no patch.
        let mut again = Replay::new(tape);
        again.alloc(1024).unwrap();
        again.kernel(seed).unwrap();
        again.call(&[9, 0x7000, 64, 64, 64]).unwrap();
        again.kernel(moved).unwrap();
        assert!(again.finish().unwrap().1.is_empty());
    }

    #[test]
    fn arguments_compare_by_their_bits() {
        assert_eq!(Arg::F32(f32::NAN), Arg::F32(f32::NAN));
        assert_ne!(Arg::F32(0.0), Arg::F32(-0.0));
        assert_ne!(Arg::U32(1), Arg::I32(1));
        assert_ne!(Arg::P(3), Arg::U64(3));
    }

    #[test]
    fn a_different_step_is_a_mismatch() {
        type Step = fn(&mut Replay) -> Result<(), Mismatch>;
        let cases: [(&str, Step, usize); 6] = [
            (
                "another kernel",
                |r| {
                    r.alloc(1024)?;
                    r.kernel(launch(3, vec![Arg::P(0x7000), Arg::U64(0)]))
                },
                1,
            ),
            (
                "another argument count",
                |r| {
                    r.alloc(1024)?;
                    r.kernel(launch(1, vec![Arg::P(0x7000)]))
                },
                1,
            ),
            ("another allocation size", |r| r.alloc(2048).map(|_| ()), 0),
            (
                "a kernel where an allocation was",
                |r| r.kernel(launch(1, vec![])),
                0,
            ),
            (
                "another GEMM",
                |r| {
                    r.alloc(1024)?;
                    r.kernel(launch(1, vec![Arg::P(0x7000), Arg::U64(0)]))?;
                    r.call(&[9, 0x7000, 64, 64, 65]).map(|_| ())
                },
                2,
            ),
            (
                "an op past the end",
                |r| {
                    r.alloc(1024)?;
                    r.kernel(launch(1, vec![Arg::P(0x7000), Arg::U64(0)]))?;
                    r.call(&[9, 0x7000, 64, 64, 64])?;
                    r.kernel(launch(2, vec![Arg::F32(0.1), Arg::P(0x8000)]))?;
                    r.alloc(8).map(|_| ())
                },
                4,
            ),
        ];
        for (what, step, at) in cases {
            let mut r = Replay::new(recorded());
            let e = step(&mut r).expect_err(what);
            assert_eq!(e.at, at, "{what}: {e}");
        }
        // Stopping short is one too.
        let mut r = Replay::new(recorded());
        r.alloc(1024).unwrap();
        let e = r.finish().expect_err("a step that stops short");
        assert_eq!(e.at, 1);
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_graphs() {
        let mut c: GraphCache<u32> = GraphCache::default();
        assert!(c.take(&[1]).is_none());
        for k in 0..MAX_GRAPHS as u64 + 1 {
            c.put(vec![k], Entry::Ready(k as u32, Tape::default(), 0));
            if k == 1 {
                // Key 0 used again: key 1 becomes the oldest.
                let e = c.take(&[0]).unwrap();
                c.put(vec![0], e);
            }
        }
        assert_eq!(c.graphs(), MAX_GRAPHS);
        assert!(matches!(c.take(&[1]), Some(Entry::Seen(0))));
        assert!(matches!(c.take(&[0]), Some(Entry::Ready(0, _, 0))));
        c.put(vec![7], Entry::Failed);
        assert!(matches!(c.take(&[7]), Some(Entry::Failed)));
    }
}
