//! Philox4x32-10, the counter-based generator behind every dropout mask.
//!
//! A counter-based generator turns (key, counter) into random bits with no state, so a mask can
//! be regenerated in backward instead of stored, and the CPU and the GPU draw the same bits for
//! the same element: `kernels/common.cuh` implements the same function.
//!
//! Element `i` of a dropout site uses word `i % 4` of the block at counter
//! `(lo(i/4), hi(i/4), lo(stream), hi(stream))` under key `(lo(seed), hi(seed))`.
//! Its uniform is `(word >> 8)·2⁻²⁴ ∈ [0, 1)`; the element is kept when `uniform ≥ p`.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Ten rounds of Philox4x32 (Salmon et al., SC'11).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The four uniforms of block `block` (elements `4·block .. 4·block+4`).
#[inline]
pub fn uniform4(seed: u64, stream: u64, block: u64) -> [f32; 4] {
    let w = philox4x32_10(
        [
            block as u32,
            (block >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    w.map(|x| (x >> 8) as f32 * (1.0 / 16_777_216.0))
}

/// The uniform of element `index`.
#[inline]
pub fn uniform(seed: u64, stream: u64, index: u64) -> f32 {
    uniform4(seed, stream, index / 4)[(index % 4) as usize]
}

/// The stream of dropout site `site` in optimizer micro-step `step`: every site of every step
/// draws fresh bits, and a resumed run draws the same ones.
pub fn stream_id(step: u64, site: u32) -> u64 {
    (step << 20) | site as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    /// The same uniforms as kernels/common.cuh's `philox_uniform4(7, 3, 5, u)`, compiled as host
    /// C++ (g++ -I kernels) when this test was written: the CPU and GPU masks agree.
    #[test]
    #[allow(clippy::excessive_precision)] // the digits as the C++ check printed them
    fn uniforms_match_the_cuda_header() {
        assert_eq!(
            uniform4(7, 3, 5),
            [0.817174017, 0.434971631, 0.815620422, 0.453849733]
        );
    }

    #[test]
    fn uniforms_are_in_range_and_roughly_uniform() {
        let n = 40_000u64;
        let mean = (0..n).map(|i| uniform(7, 3, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!((0..n).all(|i| (0.0..1.0).contains(&uniform(7, 3, i))));
        assert_ne!(uniform(7, 3, 0), uniform(7, 4, 0));
    }
}
