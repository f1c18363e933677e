//! The BERT sequence classifier: its parameters, their files, and its layer sequence.

pub mod bert;
pub mod flops;
pub mod init;
pub mod params;
pub mod weights;

use anyhow::{ensure, Result};

use crate::backend::Backend;
use crate::config::BertConfig;
use bert::Bert;
use params::{BertTensors, ParamLayout};

/// A classifier's parameters and gradients on a backend, each one flat buffer in
/// [`ParamLayout`] order, with typed views into both.
pub struct Classifier<B: Backend> {
    pub cfg: BertConfig,
    pub layout: ParamLayout,
    pub params: B::Tensor,
    pub grads: B::Tensor,
    pub weights: BertTensors<B::Tensor>,
    pub grad_views: BertTensors<B::Tensor>,
}

impl<B: Backend> Classifier<B> {
    /// Uploads `flat` (in the layout of `cfg`) and allocates zeroed gradients.
    pub fn new(backend: &B, cfg: BertConfig, flat: &[f32]) -> Result<Self> {
        let layout = ParamLayout::new(&cfg);
        ensure!(
            flat.len() == layout.total,
            "{} parameter values for a layout of {}",
            flat.len(),
            layout.total
        );
        let params = backend.upload(flat)?;
        let grads = backend.zeros(layout.total)?;
        let weights = layout.views(backend, &params, &cfg);
        let grad_views = layout.views(backend, &grads, &cfg);
        Ok(Classifier {
            cfg,
            layout,
            params,
            grads,
            weights,
            grad_views,
        })
    }

    /// The layer sequence over these weights.
    pub fn bert<'a>(&'a self, backend: &'a B) -> Bert<'a, B> {
        Bert {
            backend,
            cfg: &self.cfg,
            weights: &self.weights,
        }
    }

    pub fn zero_grads(&self, backend: &B) -> Result<()> {
        backend.fill_zero(&self.grads)
    }

    /// The parameters the dense layers' GEMMs read ([`ParamLayout::dense_range`]), one view:
    /// what [`Backend::refresh_weight_copies`] casts.
    pub fn dense_params(&self, backend: &B) -> B::Tensor {
        let (offset, len) = self.layout.dense_range();
        backend.view(&self.params, offset, len)
    }
}
