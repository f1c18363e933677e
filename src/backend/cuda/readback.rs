//! Reading a small tensor back without waiting for the whole queue.
//!
//! A plain download is ordered after everything queued before it *and* makes the host wait for
//! all of that. Here the copy goes into page-locked host memory with `cuMemcpyDtoHAsync` (the
//! only kind of host memory such a copy is asynchronous for) and an event is recorded after it;
//! `finish` waits on that event alone. The fp16 step uses it for its overflow flag: the copy is
//! queued right after the unscaling kernel and read one step later, by when the GPU is long past
//! it, so the host never waits for the work it has queued since.

use anyhow::{anyhow, Result};
use cudarc::driver::result as dres;
use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::backend::{CudaBackend, CudaTensor};

/// A copy on its way to a page-locked buffer (taken from the backend's small pool, returned to
/// it by `finish`). Dropped unfinished, it still waits for the copy before the buffer is freed
/// (`cuMemFreeHost` does not wait for copies into it).
pub struct PendingDownload {
    buf: Option<PinnedHostSlice<f32>>,
    len: usize,
    done: CudaEvent,
}

impl Drop for PendingDownload {
    fn drop(&mut self) {
        if self.buf.is_some() {
            let _ = self.done.synchronize();
        }
    }
}

impl PendingDownload {
    pub(super) fn start(be: &CudaBackend, t: &CudaTensor) -> Result<Self> {
        let len = t.len();
        // The copy below is queued on this thread: a pooled buffer binds nothing on its way.
        be.bind()?;
        let mut buf = be.take_pinned(len)?;
        let host = buf
            .as_mut_slice()
            .map_err(|e| anyhow!("page-locked buffer: {e}"))?;
        let stream = be.stream();
        if len > 0 {
            // SAFETY: `host` holds at least `len` f32 and stays allocated (owned by the returned
            // value) until `finish` has waited for the copy; the source is a live allocation.
            unsafe {
                dres::memcpy_dtoh_async(&mut host[..len], t.device_ptr(), stream.cu_stream())
            }
            .map_err(|e| anyhow!("device-to-host copy: {e}"))?;
        }
        let done = stream
            .record_event(None)
            .map_err(|e| anyhow!("recording a CUDA event: {e}"))?;
        Ok(PendingDownload {
            buf: Some(buf),
            len,
            done,
        })
    }

    pub(super) fn finish(mut self, be: &CudaBackend) -> Result<Vec<f32>> {
        self.done
            .synchronize()
            .map_err(|e| anyhow!("waiting for a device-to-host copy: {e}"))?;
        let buf = self.buf.take().expect("a pending download owns its buffer");
        let values = buf
            .as_slice()
            .map_err(|e| anyhow!("page-locked buffer: {e}"))?[..self.len]
            .to_vec();
        be.return_pinned(buf);
        Ok(values)
    }
}
