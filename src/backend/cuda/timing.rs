//! GPU time of work queued on a [`CudaBackend`]'s stream, measured with CUDA events (for the
//! per-kernel benches, `benches/gpu_kernels.rs`).
//!
//! A timing-enabled event is recorded on the backend's stream before and after the work; the
//! driver's `cuEventElapsedTime` between them is the stream's time from the GPU reaching the
//! first event to it reaching the second: every kernel, copy and cuBLAS call the work queued,
//! and any gap in which the GPU waited for the host to queue more (an op whose launches cost
//! the host more than its kernels cost the GPU is measured at the host's pace). The host does
//! not wait between runs, so consecutive runs overlap their launch overhead with the GPU's work,
//! as in a training step. The events' resolution is about half a microsecond: time enough runs
//! together for short kernels.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Result};
use cudarc::driver::sys as dsys;

use super::backend::CudaBackend;
use super::libs::check_cudarc_library;

/// The driver functions the timing calls through cudarc (event create, record, synchronize,
/// elapsed time, destroy: cuda-13000 bindings), checked once before the first use since cudarc
/// panics on a missing one. The backend's own `DRIVER_SYMBOLS` are checked when it opens.
const EVENT_SYMBOLS: &[&str] = &[
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
];

fn check_event_symbols() -> Result<()> {
    static CHECKED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            // SAFETY: a CudaBackend exists, so the driver is loaded and culib() is not empty.
            check_cudarc_library(
                "the CUDA driver",
                "cuda",
                unsafe { dsys::culib() },
                EVENT_SYMBOLS,
            )
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

impl CudaBackend {
    /// The GPU time of `iters` runs of `f`, which queues work on this backend (its ops do):
    /// events recorded on the backend's stream before the first run and after the last, then
    /// waited for (see the module header for what the time includes). Divide by `iters` for one
    /// run. The first error of `f`, or an asynchronous kernel failure, is returned.
    pub fn time_on_stream(
        &self,
        iters: u64,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Duration> {
        check_event_symbols()?;
        let timed = Some(dsys::CUevent_flags::CU_EVENT_DEFAULT);
        let stream = self.stream();
        let start = stream
            .record_event(timed)
            .map_err(|e| anyhow!("recording a CUDA event: {e}"))?;
        for _ in 0..iters {
            f()?;
        }
        let end = stream
            .record_event(timed)
            .map_err(|e| anyhow!("recording a CUDA event: {e}"))?;
        // Waits for both events (and so for every run).
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| anyhow!("timing the CUDA stream: {e}"))?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}
