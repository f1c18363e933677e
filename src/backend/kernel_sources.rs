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

    /// loss.cu spells the ignored label as the Rust side does.
    #[test]
    fn loss_kernels_ignore_the_rust_ignore_label() {
        let src = super::kernel_source("loss.cu").unwrap();
        let define = format!("#define IGNORE_LABEL {:#x}u", crate::backend::IGNORE_LABEL);
        assert!(src.contains(&define), "loss.cu lacks `{define}`");
    }
}
