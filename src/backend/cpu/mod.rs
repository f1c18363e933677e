//! The CPU backend: plain Rust, fp32, multi-threaded with rayon and the gemm crate.
//!
//! It is the reference every CUDA kernel is tested against and the fallback without a GPU. Each
//! op family lives in its own file, named as its kernel in `kernels/`, with the math and the
//! memory layout in the file's header comment; this file only binds them to [`Backend`].

pub mod activation;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod gather;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod optim;
mod tensor;

use std::sync::Arc;

use anyhow::{ensure, Result};

use tensor::check_disjoint;
pub use tensor::CpuTensor;

use super::{
    attention_rounding, Activation, AdamWStep, AdamWTensor, AttentionDims, Backend, BranchGrad,
    Dropout, Dtype, MatmulPrecision, ResidualAdd, SeqLayout,
};

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    /// The format the dense layers' GEMM operands are rounded to (emulating the GPU's).
    precision: MatmulPrecision,
    /// Whether the trainer and evaluation pad batches to their buckets as for CUDA graphs
    /// ([`Backend::pads_to_buckets`]; tests check the padding changes no result).
    bucket_padding: bool,
}

impl CpuBackend {
    /// The fp32 reference.
    pub const FP32: CpuBackend = CpuBackend {
        precision: MatmulPrecision::F32,
        bucket_padding: false,
    };

    pub fn with_matmul_precision(precision: MatmulPrecision) -> Self {
        CpuBackend {
            precision,
            bucket_padding: false,
        }
    }

    /// This backend, with batches padded to their sequence and row buckets by the trainer and
    /// evaluation as they are when steps run as CUDA graphs (there are no graphs on the CPU).
    pub const fn with_bucket_padding(self) -> Self {
        CpuBackend {
            bucket_padding: true,
            ..self
        }
    }

    /// The elements of a tensor an op reads as a GEMM operand or an activation's input: fp32,
    /// or stored in this backend's matmul format (the values a GEMM in that format reads).
    fn matmul_input<'t>(&self, t: &'t CpuTensor, what: &str) -> Result<&'t [f32]> {
        self.check_matmul_format(t, what)?;
        Ok(t.values())
    }

    /// The elements of an output that may be stored in the matmul format, to write in fp32 (the
    /// op then rounds them: [`CpuTensor::round_stored`]).
    #[allow(clippy::mut_from_ref)]
    fn matmul_output<'t>(&self, t: &'t CpuTensor, what: &str) -> Result<&'t mut [f32]> {
        self.check_matmul_format(t, what)?;
        Ok(t.values_mut())
    }

    /// Checks that attention's `qkv` or `out` (`name`) is fp32, or stored in the matmul format
    /// where attention rounds to that format anyway ([`Backend::attention_rounding`]: reading a
    /// stored qkv changes nothing, and a stored out is the fp32 one rounded once).
    fn check_attention_dtype(
        &self,
        t: &CpuTensor,
        name: &str,
        dims: AttentionDims,
        what: &str,
    ) -> Result<()> {
        if t.dtype() != Dtype::F32 {
            let rounding = attention_rounding(self.precision, dims.head_dim);
            ensure!(
                rounding.storage_dtype() == t.dtype(),
                "{what}: a {} {name}, but head dim {} attention rounds to {}",
                t.dtype().name(),
                dims.head_dim,
                rounding.name()
            );
        }
        Ok(())
    }

    fn check_matmul_format(&self, t: &CpuTensor, what: &str) -> Result<()> {
        let format = self.precision.storage_dtype();
        ensure!(
            t.dtype() == Dtype::F32 || t.dtype() == format,
            "{what} is {}, neither fp32 nor this backend's matmul format ({})",
            t.dtype().name(),
            format.name()
        );
        Ok(())
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Ids = Arc<Vec<u32>>;

    fn pads_to_buckets(&self) -> bool {
        self.bucket_padding
    }

    fn name(&self) -> String {
        let threads = rayon::current_num_threads();
        match self.precision {
            MatmulPrecision::F32 => format!("cpu ({threads} threads)"),
            p => format!(
                "cpu ({threads} threads, {} GEMM operands emulated)",
                p.name()
            ),
        }
    }
    fn matmul_precision(&self) -> MatmulPrecision {
        self.precision
    }

    fn zeros(&self, len: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::zeros(len))
    }
    fn zeros_in_matmul_format(&self, len: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::zeros_of(len, self.precision.storage_dtype()))
    }
    fn dtype(&self, t: &CpuTensor) -> Dtype {
        t.dtype()
    }
    fn upload(&self, data: &[f32]) -> Result<CpuTensor> {
        Ok(CpuTensor::from_vec(data.to_vec()))
    }
    fn upload_ids(&self, data: &[u32]) -> Result<Self::Ids> {
        Ok(Arc::new(data.to_vec()))
    }
    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.values().to_vec())
    }
    fn view(&self, t: &CpuTensor, offset: usize, len: usize) -> CpuTensor {
        t.view(offset, len)
    }
    fn len(&self, t: &CpuTensor) -> usize {
        t.len()
    }
    fn fill_zero(&self, t: &CpuTensor) -> Result<()> {
        t.values_mut().fill(0.0);
        Ok(())
    }
    fn copy(&self, dst: &CpuTensor, src: &CpuTensor) -> Result<()> {
        check_disjoint(&[dst], &[src]);
        ensure!(
            dst.len() == src.len() && (dst.dtype() == src.dtype() || src.dtype() == Dtype::F32),
            "copy of {} {} elements into {} {}",
            src.len(),
            src.dtype().name(),
            dst.len(),
            dst.dtype().name()
        );
        dst.values_mut().copy_from_slice(src.values());
        dst.round_stored();
        Ok(())
    }

    fn linear_forward(
        &self,
        out: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: &CpuTensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        check_disjoint(&[out], &[x, w, bias]);
        matmul::linear_forward(
            self.matmul_output(out, "linear_forward's out")?,
            self.matmul_input(x, "linear_forward's x")?,
            w.data(),
            bias.data(),
            rows,
            k,
            n,
            self.precision,
        );
        out.round_stored();
        Ok(())
    }

    fn linear_backward(
        &self,
        dx: Option<&CpuTensor>,
        dx_accumulate: bool,
        dw: &CpuTensor,
        dbias: &CpuTensor,
        dout: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let outs: Vec<&CpuTensor> = dx.into_iter().chain([dw, dbias]).collect();
        check_disjoint(&outs, &[dout, x, w]);
        let dx = dx.map(|t| t.data_mut());
        matmul::linear_backward(
            dx,
            dx_accumulate,
            dw.data_mut(),
            dbias.data_mut(),
            dout.data(),
            self.matmul_input(x, "linear_backward's x")?,
            w.data(),
            rows,
            k,
            n,
            self.precision,
        );
        Ok(())
    }

    fn embeddings_forward(
        &self,
        out: &CpuTensor,
        word: &CpuTensor,
        position: &CpuTensor,
        token_type: &CpuTensor,
        ids: &Self::Ids,
        positions: &Self::Ids,
        type_ids: &Self::Ids,
        hidden: usize,
    ) -> Result<()> {
        check_disjoint(&[out], &[word, position, token_type]);
        embedding::embeddings_forward(
            out.data_mut(),
            word.data(),
            position.data(),
            token_type.data(),
            ids,
            positions,
            type_ids,
            hidden,
        );
        Ok(())
    }

    fn embeddings_backward(
        &self,
        dword: &CpuTensor,
        dposition: &CpuTensor,
        dtoken_type: &CpuTensor,
        dout: &CpuTensor,
        ids: &Self::Ids,
        positions: &Self::Ids,
        type_ids: &Self::Ids,
        hidden: usize,
        padding_idx: Option<u32>,
    ) -> Result<()> {
        check_disjoint(&[dword, dposition, dtoken_type], &[dout]);
        embedding::embeddings_backward(
            dword.data_mut(),
            dposition.data_mut(),
            dtoken_type.data_mut(),
            dout.data(),
            ids,
            positions,
            type_ids,
            hidden,
            padding_idx,
        );
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &CpuTensor,
        out_copy: Option<&CpuTensor>,
        mean: &CpuTensor,
        rstd: &CpuTensor,
        x: &CpuTensor,
        residual: Option<ResidualAdd<'_, CpuTensor>>,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        if let Some(copy) = out_copy {
            ensure!(
                copy.dtype() != Dtype::F32 && copy.len() == out.len(),
                "layernorm_forward: a copy of {} {} elements of an output of {}",
                copy.len(),
                copy.dtype().name(),
                out.len()
            );
            self.check_matmul_format(copy, "layernorm_forward's copy")?;
            let sum = residual.as_ref().map(|r| r.sum);
            let others = [
                Some(out),
                Some(x),
                Some(mean),
                Some(rstd),
                Some(gamma),
                Some(beta),
            ];
            let others: Vec<&CpuTensor> = others
                .into_iter()
                .chain([residual.as_ref().map(|r| r.residual), sum])
                .flatten()
                .collect();
            check_disjoint(&[copy], &others);
        }
        let normalized = match residual {
            Some(ResidualAdd {
                residual,
                sum,
                dropout,
            }) => {
                check_disjoint(&[sum, out, mean, rstd], &[x, residual, gamma, beta]);
                layernorm::residual_add(sum.data_mut(), x.data(), residual.data(), dropout);
                sum
            }
            None => {
                check_disjoint(&[out, mean, rstd], &[x, gamma, beta]);
                x
            }
        };
        layernorm::layernorm_forward(
            out.data_mut(),
            mean.data_mut(),
            rstd.data_mut(),
            normalized.data(),
            gamma.data(),
            beta.data(),
            rows,
            cols,
            eps,
        );
        if let Some(copy) = out_copy {
            copy.values_mut().copy_from_slice(out.data());
            copy.round_stored();
        }
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dx: &CpuTensor,
        dgamma: &CpuTensor,
        dbeta: &CpuTensor,
        dout: &CpuTensor,
        x: &CpuTensor,
        mean: &CpuTensor,
        rstd: &CpuTensor,
        gamma: &CpuTensor,
        rows: usize,
        cols: usize,
        branch: Option<BranchGrad<'_, CpuTensor>>,
    ) -> Result<()> {
        check_disjoint(&[dx, dgamma, dbeta], &[dout, x, mean, rstd, gamma]);
        if let Some(branch) = &branch {
            check_disjoint(
                &[branch.dx],
                &[dx, dgamma, dbeta, dout, x, mean, rstd, gamma],
            );
        }
        layernorm::layernorm_backward(
            dx.data_mut(),
            dgamma.data_mut(),
            dbeta.data_mut(),
            dout.data(),
            x.data(),
            mean.data(),
            rstd.data(),
            gamma.data(),
            rows,
            cols,
        );
        if let Some(BranchGrad {
            dx: dbranch,
            dropout,
        }) = branch
        {
            dropout::dropout_backward(dbranch.data_mut(), dx.data(), dropout);
        }
        Ok(())
    }

    fn activation_forward(&self, out: &CpuTensor, x: &CpuTensor, act: Activation) -> Result<()> {
        check_disjoint(&[out], &[x]);
        ensure!(
            out.dtype() == x.dtype(),
            "activation_forward: a {} x into a {} out",
            x.dtype().name(),
            out.dtype().name()
        );
        activation::activation_forward(
            self.matmul_output(out, "activation_forward's out")?,
            self.matmul_input(x, "activation_forward's x")?,
            act,
        );
        out.round_stored();
        Ok(())
    }
    fn activation_backward(
        &self,
        dx: &CpuTensor,
        dout: &CpuTensor,
        x: &CpuTensor,
        act: Activation,
    ) -> Result<()> {
        check_disjoint(&[dx], &[dout, x]);
        activation::activation_backward(
            dx.data_mut(),
            dout.data(),
            self.matmul_input(x, "activation_backward's x")?,
            act,
        );
        Ok(())
    }
    fn tanh_forward(&self, out: &CpuTensor, x: &CpuTensor) -> Result<()> {
        check_disjoint(&[out], &[x]);
        activation::tanh_forward(out.data_mut(), x.data());
        Ok(())
    }
    fn tanh_backward(&self, dx: &CpuTensor, dout: &CpuTensor, y: &CpuTensor) -> Result<()> {
        check_disjoint(&[dx], &[dout, y]);
        activation::tanh_backward(dx.data_mut(), dout.data(), y.data());
        Ok(())
    }

    fn dropout_forward(&self, out: &CpuTensor, x: &CpuTensor, d: Dropout) -> Result<()> {
        check_disjoint(&[out], &[x]);
        dropout::dropout_forward(out.data_mut(), x.data(), d);
        Ok(())
    }
    fn dropout_backward(&self, dx: &CpuTensor, dout: &CpuTensor, d: Dropout) -> Result<()> {
        check_disjoint(&[dx], &[dout]);
        dropout::dropout_backward(dx.data_mut(), dout.data(), d);
        Ok(())
    }

    fn gather_first_tokens(
        &self,
        out: &CpuTensor,
        x: &CpuTensor,
        layout: &SeqLayout,
        hidden: usize,
    ) -> Result<()> {
        check_disjoint(&[out], &[x]);
        gather::gather_first_tokens(out.data_mut(), x.data(), layout, hidden);
        Ok(())
    }
    fn scatter_first_tokens_backward(
        &self,
        dx: &CpuTensor,
        dout: &CpuTensor,
        layout: &SeqLayout,
        hidden: usize,
    ) -> Result<()> {
        check_disjoint(&[dx], &[dout]);
        gather::scatter_first_tokens_backward(dx.data_mut(), dout.data(), layout, hidden);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &CpuTensor,
        lse: &CpuTensor,
        qkv: &CpuTensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()> {
        check_disjoint(&[out, lse], &[qkv]);
        let what = "attention_forward";
        self.check_attention_dtype(out, "out", dims, what)?;
        self.check_attention_dtype(qkv, "qkv", dims, what)?;
        attention::attention_forward(
            out.values_mut(),
            lse.data_mut(),
            qkv.values(),
            layout,
            dims,
            dropout,
            attention_rounding(self.precision, dims.head_dim),
        );
        // A 16-bit out holds o rounded once, as the tensor-core kernels store it.
        out.round_stored();
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &CpuTensor,
        dout: &CpuTensor,
        qkv: &CpuTensor,
        out: &CpuTensor,
        lse: &CpuTensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()> {
        check_disjoint(&[dqkv], &[dout, qkv, out, lse]);
        let what = "attention_backward";
        self.check_attention_dtype(out, "out", dims, what)?;
        self.check_attention_dtype(qkv, "qkv", dims, what)?;
        attention::attention_backward(
            dqkv.data_mut(),
            dout.data(),
            qkv.values(),
            out.values(),
            lse.data(),
            layout,
            dims,
            dropout,
            attention_rounding(self.precision, dims.head_dim),
        );
        Ok(())
    }

    fn cross_entropy_forward(
        &self,
        losses: &CpuTensor,
        logits: &CpuTensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
    ) -> Result<()> {
        check_disjoint(&[losses], &[logits]);
        loss::cross_entropy_forward(losses.data_mut(), logits.data(), labels, classes, smoothing);
        Ok(())
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &CpuTensor,
        logits: &CpuTensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
        scale: f32,
    ) -> Result<()> {
        check_disjoint(&[dlogits], &[logits]);
        loss::cross_entropy_backward(
            dlogits.data_mut(),
            logits.data(),
            labels,
            classes,
            smoothing,
            scale,
        );
        Ok(())
    }
    fn cross_entropy_forward_backward(
        &self,
        losses: &CpuTensor,
        dlogits: &CpuTensor,
        logits: &CpuTensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
        scale: f32,
    ) -> Result<()> {
        check_disjoint(&[losses, dlogits], &[logits]);
        loss::cross_entropy_forward_backward(
            losses.data_mut(),
            dlogits.data_mut(),
            logits.data(),
            labels,
            classes,
            smoothing,
            scale,
        );
        Ok(())
    }

    fn sum_squares(&self, out: &CpuTensor, x: &CpuTensor) -> Result<()> {
        check_disjoint(&[out], &[x]);
        out.data_mut()[0] = optim::sum_squares(x.data()) as f32;
        Ok(())
    }
    fn clip_by_global_norm(&self, x: &CpuTensor, sumsq: &CpuTensor, max_norm: f32) -> Result<()> {
        check_disjoint(&[x], &[sumsq]);
        optim::clip_by_global_norm(x.data_mut(), sumsq.data()[0] as f64, max_norm);
        Ok(())
    }
    fn scale_by(&self, x: &CpuTensor, s: &CpuTensor) -> Result<()> {
        check_disjoint(&[x], &[s]);
        let factor = s.data()[0];
        x.data_mut().iter_mut().for_each(|v| *v *= factor);
        Ok(())
    }
    fn unscale_and_check(
        &self,
        x: &CpuTensor,
        scale: &CpuTensor,
        found_inf: &CpuTensor,
    ) -> Result<()> {
        check_disjoint(&[x, found_inf], &[scale]);
        if optim::unscale_and_check(x.data_mut(), 1.0 / scale.data()[0]) {
            found_inf.data_mut()[0] = 1.0;
        }
        Ok(())
    }
    fn update_loss_scale(
        &self,
        state: &CpuTensor,
        found_inf: &CpuTensor,
        growth: f32,
        backoff: f32,
        growth_interval: u32,
    ) -> Result<()> {
        check_disjoint(&[state], &[found_inf]);
        let found = found_inf.data()[0] != 0.0;
        optim::update_loss_scale(
            &mut state.data_mut()[..2],
            found,
            growth,
            backoff,
            growth_interval,
        );
        Ok(())
    }
    type Pending = Vec<f32>;
    fn download_start(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        // fp32 only, as the CUDA backend's pinned read-back.
        Ok(t.data().to_vec())
    }
    fn download_finish(&self, pending: Vec<f32>) -> Result<Vec<f32>> {
        Ok(pending)
    }
    fn adamw_update(
        &self,
        tensors: &[AdamWTensor<'_, CpuTensor>],
        step: &AdamWStep,
        skip: Option<&CpuTensor>,
    ) -> Result<()> {
        if skip.is_some_and(|s| s.data()[0] != 0.0) {
            return Ok(());
        }
        for t in tensors {
            check_disjoint(&[t.param, t.exp_avg, t.exp_avg_sq], &[t.grad]);
            optim::adamw_update(
                t.param.data_mut(),
                t.grad.data(),
                t.exp_avg.data_mut(),
                t.exp_avg_sq.data_mut(),
                t.weight_decay,
                step,
            );
        }
        Ok(())
    }
}
