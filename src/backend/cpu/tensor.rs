//! The CPU backend's tensor: a view into shared, fixed-size fp32 storage.
//!
//! Views behave like device pointers: several may point into one buffer (all parameters share
//! one), and an op reads its inputs and writes its outputs through them.
//!
//! A tensor of a 16-bit [`Dtype`] is emulated: its storage is fp32 holding values the type can
//! represent (an op that writes one rounds what it stores, [`CpuTensor::round_stored`]). Only
//! ops that take 16-bit tensors read them ([`CpuTensor::values`]); [`CpuTensor::data`], what
//! every other op reads through, panics on one, so that the model code the CUDA backend also
//! runs is checked here never to hand a 16-bit tensor to an op that reads fp32. The op boundary
//! guarantees that an op's outputs never overlap its inputs or each other; `check_disjoint`
//! asserts it in debug builds, which is what makes the slices handed out here sound.

use std::cell::UnsafeCell;
use std::sync::Arc;

use crate::backend::Dtype;

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
    dtype: Dtype,
}

impl CpuTensor {
    pub fn from_vec(data: Vec<f32>) -> Self {
        let len = data.len();
        CpuTensor {
            storage: Arc::new(Storage(UnsafeCell::new(data.into_boxed_slice()))),
            offset: 0,
            len,
            dtype: Dtype::F32,
        }
    }

    pub fn zeros(len: usize) -> Self {
        Self::from_vec(vec![0.0; len])
    }

    /// `len` zeros of type `dtype`.
    pub fn zeros_of(len: usize, dtype: Dtype) -> Self {
        CpuTensor {
            dtype,
            ..Self::zeros(len)
        }
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
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
            dtype: self.dtype,
        }
    }

    fn base(&self) -> *mut f32 {
        // SAFETY: the pointer is only offset within the allocation (checked in `view`).
        unsafe { (*self.storage.0.get()).as_mut_ptr().add(self.offset) }
    }

    /// The elements of an fp32 tensor, read-only.
    ///
    /// # Panics
    /// On a 16-bit tensor: the op reading it reads fp32 only (see the module header).
    pub fn data(&self) -> &[f32] {
        self.expect_f32();
        self.values()
    }

    /// The elements of an fp32 tensor, to write. Only an op's outputs are taken this way.
    ///
    /// # Panics
    /// On a 16-bit tensor, as [`CpuTensor::data`].
    #[allow(clippy::mut_from_ref)]
    pub fn data_mut(&self) -> &mut [f32] {
        self.expect_f32();
        self.values_mut()
    }

    /// The elements whatever the type (a 16-bit tensor's are values of its type), for the ops
    /// that take 16-bit tensors.
    pub fn values(&self) -> &[f32] {
        // SAFETY: in bounds; no output of the running op overlaps this input (op boundary rule).
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }

    /// The elements whatever the type, to write; a writer of a 16-bit tensor calls
    /// [`CpuTensor::round_stored`] once it has written them.
    #[allow(clippy::mut_from_ref)]
    pub fn values_mut(&self) -> &mut [f32] {
        // SAFETY: as `values`; outputs of one op are pairwise disjoint and disjoint from inputs.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.len) }
    }

    /// Rounds the elements to the tensor's type: what storing fp32 results in it gives.
    pub fn round_stored(&self) {
        if self.dtype != Dtype::F32 {
            let dtype = self.dtype;
            self.values_mut()
                .iter_mut()
                .for_each(|v| *v = dtype.round(*v));
        }
    }

    fn expect_f32(&self) {
        assert!(
            self.dtype == Dtype::F32,
            "a {} tensor was given to an op that reads and writes fp32 only",
            self.dtype.name()
        );
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
