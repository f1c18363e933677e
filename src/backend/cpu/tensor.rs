//! The CPU backend's tensor: a view into shared, fixed-size fp32 storage.
//!
//! Views behave like device pointers: several may point into one buffer (all parameters share
//! one), and an op reads its inputs and writes its outputs through them. The op boundary
//! guarantees that an op's outputs never overlap its inputs or each other; `check_disjoint`
//! asserts it in debug builds, which is what makes the slices handed out here sound.

use std::cell::UnsafeCell;
use std::sync::Arc;

struct Storage(UnsafeCell<Box<[f32]>>);

// SAFETY: access goes through `CpuTensor`, whose users uphold the no-overlap rule above;
// storage is never resized, so pointers into it stay valid while any view lives.
unsafe impl Sync for Storage {}
unsafe impl Send for Storage {}

#[derive(Clone)]
pub struct CpuTensor {
    storage: Arc<Storage>,
    offset: usize,
    len: usize,
}

impl CpuTensor {
    pub fn from_vec(data: Vec<f32>) -> Self {
        let len = data.len();
        CpuTensor {
            storage: Arc::new(Storage(UnsafeCell::new(data.into_boxed_slice()))),
            offset: 0,
            len,
        }
    }

    pub fn zeros(len: usize) -> Self {
        Self::from_vec(vec![0.0; len])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn view(&self, offset: usize, len: usize) -> Self {
        assert!(
            offset + len <= self.len,
            "view {offset}+{len} out of a tensor of {}",
            self.len
        );
        CpuTensor {
            storage: self.storage.clone(),
            offset: self.offset + offset,
            len,
        }
    }

    fn base(&self) -> *mut f32 {
        // SAFETY: the pointer is only offset within the allocation (checked in `view`).
        unsafe { (*self.storage.0.get()).as_mut_ptr().add(self.offset) }
    }

    /// The elements, read-only.
    pub fn data(&self) -> &[f32] {
        // SAFETY: in bounds; no output of the running op overlaps this input (op boundary rule).
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }

    /// The elements, to write. Only an op's outputs are taken this way.
    #[allow(clippy::mut_from_ref)]
    pub fn data_mut(&self) -> &mut [f32] {
        // SAFETY: as `data`; outputs of one op are pairwise disjoint and disjoint from inputs.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.len) }
    }

    fn range(&self) -> (usize, usize) {
        let start = self.base() as usize;
        (start, start + self.len * 4)
    }

    fn same_storage(&self, other: &CpuTensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
}

/// Debug-build check of the op boundary's aliasing rule.
pub fn check_disjoint(outputs: &[&CpuTensor], inputs: &[&CpuTensor]) {
    if cfg!(debug_assertions) {
        for (i, o) in outputs.iter().enumerate() {
            for other in outputs[i + 1..].iter().chain(inputs.iter()) {
                if o.same_storage(other) {
                    let ((a0, a1), (b0, b1)) = (o.range(), other.range());
                    assert!(
                        a1 <= b0 || b1 <= a0,
                        "an op's output overlaps another of its tensors"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_storage() {
        let t = CpuTensor::from_vec((0..10).map(|x| x as f32).collect());
        let v = t.view(2, 3);
        v.data_mut()[0] = 100.0;
        assert_eq!(t.data()[2], 100.0);
        assert_eq!(v.view(1, 2).data(), &[3.0, 4.0]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    #[cfg(debug_assertions)]
    fn overlapping_output_is_caught() {
        let t = CpuTensor::zeros(10);
        check_disjoint(&[&t.view(0, 5)], &[&t.view(4, 2)]);
    }
}
