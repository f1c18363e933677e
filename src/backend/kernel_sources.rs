//! The CUDA kernel sources embedded by build.rs (compiled at run time by NVRTC).

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The source of `kernels/{name}`.
pub fn kernel_source(name: &str) -> Option<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn common_header_is_embedded() {
        assert!(super::kernel_source("common.cuh")
            .unwrap()
            .contains("philox4x32_10"));
    }
}
