//! The peak FLOP/s MFU is measured against.

/// The GPUs whose peak is known without `--peak-tflops`: dense fp16/bf16 tensor-core TFLOP/s of
/// the SXM parts (H100 and H200 share their compute). The bf16/fp16 peak is the one PyTorch
/// runs reach with `--fp16`/`--bf16`, so every implementation is measured against the same
/// number whatever precision it computes in. PCIe and NVL variants are slower: give
/// `--peak-tflops` for them, and for any other GPU or the CPU.
const KNOWN_GPUS: &[(&str, f64)] = &[("H100", 989.0), ("H200", 989.0)];
const SLOWER_VARIANTS: &[&str] = &["PCIe", "NVL"];

/// `--peak-tflops` when given; else, on CUDA, the known peak of the GPU the backend names.
pub fn peak_tflops(given: Option<f64>, on_cuda: bool, backend_name: &str) -> Option<f64> {
    given.or_else(|| {
        on_cuda
            .then(|| {
                KNOWN_GPUS
                    .iter()
                    .find(|(gpu, _)| backend_name.contains(gpu))
                    .map(|&(_, tflops)| tflops)
                    // The slower variants of the same names: their peak must be given.
                    .filter(|_| !SLOWER_VARIANTS.iter().any(|v| backend_name.contains(v)))
            })
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_given_values_and_the_cpu() {
        let h200 = "cuda:0 (NVIDIA H200, sm_90, 132 SMs, cuBLAS 13.0.0, fp32)";
        assert_eq!(peak_tflops(None, true, h200), Some(989.0));
        assert_eq!(
            peak_tflops(None, true, "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)"),
            Some(989.0)
        );
        assert_eq!(peak_tflops(Some(312.0), true, h200), Some(312.0));
        assert_eq!(
            peak_tflops(None, true, "cuda:0 (NVIDIA A100-SXM4-80GB)"),
            None
        );
        assert_eq!(
            peak_tflops(None, true, "cuda:0 (NVIDIA H100 PCIe, sm_90)"),
            None
        );
        assert_eq!(
            peak_tflops(None, true, "cuda:0 (NVIDIA H200 NVL, sm_90)"),
            None
        );
        assert_eq!(peak_tflops(None, false, "cpu (2 threads)"), None);
        assert_eq!(peak_tflops(Some(1.5), false, "cpu (2 threads)"), Some(1.5));
    }
}
