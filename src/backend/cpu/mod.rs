//! The CPU backend: plain Rust, fp32, multi-threaded with rayon and the gemm crate.
//! It is the reference every CUDA kernel is tested against.
