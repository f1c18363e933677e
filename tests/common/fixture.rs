//! Reading the PyTorch fixtures (`tests/fixtures/*.safetensors`, written by make_fixtures.py).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

/// A batch's rows: token ids, token type ids, and labels when the fixture has them.
pub type Rows = (Vec<Vec<u32>>, Vec<Vec<u32>>, Option<Vec<u32>>);

pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(path: &Path) -> Fixture {
        Fixture {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().map(str::to_string).collect()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st()
            .tensor(name)
            .unwrap_or_else(|_| panic!("no tensor {name}"))
            .shape()
            .to_vec()
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("no tensor {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("no tensor {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        meta.metadata().clone().unwrap_or_default()
    }

    /// The rows of a padded `[batch, seq]` batch (`{prefix}input_ids`, …), cut to their
    /// attention-mask lengths: (ids, token type ids, labels if present).
    pub fn batch(&self, prefix: &str) -> Rows {
        let shape = self.shape(&format!("{prefix}input_ids"));
        let (ids, types, mask) = (
            self.i64(&format!("{prefix}input_ids")),
            self.i64(&format!("{prefix}token_type_ids")),
            self.i64(&format!("{prefix}attention_mask")),
        );
        let seq = shape[1];
        let (mut out_ids, mut out_types) = (vec![], vec![]);
        for b in 0..shape[0] {
            let len = mask[b * seq..(b + 1) * seq]
                .iter()
                .filter(|&&m| m == 1)
                .count();
            out_ids.push(
                ids[b * seq..b * seq + len]
                    .iter()
                    .map(|&v| v as u32)
                    .collect(),
            );
            out_types.push(
                types[b * seq..b * seq + len]
                    .iter()
                    .map(|&v| v as u32)
                    .collect(),
            );
        }
        let labels_name = format!("{prefix}labels");
        let labels = self
            .names()
            .contains(&labels_name)
            .then(|| self.i64(&labels_name).iter().map(|&v| v as u32).collect());
        (out_ids, out_types, labels)
    }
}

/// Largest absolute difference; infinite where a difference is NaN (a NaN or infinite value on
/// either side): `f32::max` would drop a NaN, and a NaN weight would pass any bound.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The attention key biases: softmax is invariant to a shift shared by all keys, so their exact
/// gradient is 0 and a computed one is pure rounding noise. AdamW normalizes that noise into
/// full-size steps of arbitrary sign, so two correct implementations (or two summation orders)
/// move them differently; they are compared by other means.
pub fn has_zero_exact_gradient(name: &str) -> bool {
    name.ends_with("attention.self.key.bias")
}
