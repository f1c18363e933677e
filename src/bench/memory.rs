//! Peak memory of a benchmark setting: the device's where the backend counts it, else the
//! process's peak resident set (what the CPU backend's tensors live in).

use crate::backend::Backend;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryProbe {
    /// The process's peak RSS (`VmHWM`), reset before each setting where Linux allows it, so
    /// that each setting reports its own peak (the model's weights included).
    HostRss,
    /// [`Backend::peak_memory_bytes`]: the peak since the last
    /// [`Backend::reset_peak_memory`] (made before each setting).
    Device,
}

impl MemoryProbe {
    /// What the number means, for the table's preamble and the JSON.
    pub fn describe(self) -> &'static str {
        match self {
            MemoryProbe::HostRss => "host peak RSS (VmHWM)",
            MemoryProbe::Device => "device bytes allocated by the backend",
        }
    }

    /// Starts a new peak, where possible.
    pub fn reset<B: Backend>(self, backend: &B) {
        match self {
            // "5" resets VmHWM to the current RSS (Linux ≥ 4.0); elsewhere the peak stays the
            // process's, which is still an upper bound.
            MemoryProbe::HostRss => {
                let _ = std::fs::write("/proc/self/clear_refs", "5");
            }
            MemoryProbe::Device => backend.reset_peak_memory(),
        }
    }

    pub fn peak_bytes<B: Backend>(self, backend: &B) -> Option<u64> {
        match self {
            MemoryProbe::HostRss => std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| vm_hwm_bytes(&s)),
            MemoryProbe::Device => backend.peak_memory_bytes(),
        }
    }
}

/// The `VmHWM:  1234 kB` line of `/proc/<pid>/status`, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next()? {
        "kB" => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn reads_vm_hwm() {
        let status = "Name:\tbertft\nVmPeak:\t  900 kB\nVmHWM:\t    1536 kB\nVmRSS:\t  1000 kB\n";
        assert_eq!(vm_hwm_bytes(status), Some(1536 * 1024));
        assert_eq!(vm_hwm_bytes("VmRSS: 5 kB\n"), None);
    }

    #[test]
    fn probes_this_process() {
        if cfg!(target_os = "linux") {
            MemoryProbe::HostRss.reset(&CpuBackend::FP32);
            assert!(MemoryProbe::HostRss.peak_bytes(&CpuBackend::FP32).unwrap() > 0);
        }
        assert_eq!(MemoryProbe::Device.peak_bytes(&CpuBackend::FP32), None);
    }
}
