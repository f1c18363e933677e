//! The parameter list of every kernel the backend launches, declared once, as a struct per
//! family of kernels that share one list.
//!
//! A launch passes raw bytes: an argument list that disagrees with the kernel's parameters (one
//! too few, a 32-bit value where the kernel reads 64 bits, a length where it reads a pointer) is
//! not an error the driver can see, just wrong memory. So the launchers never build argument
//! lists by hand: they fill one of the structs below by field name, which the compiler checks,
//! and [`CudaBackend`](super::CudaBackend)'s `launch` turns it into the list in declared order.
//! The declarations themselves are checked against the compiled kernels by
//! tests/kernel_signatures.rs, with no GPU: the kinds against the C++ types NVRTC compiled
//! (read from mangled names, [`demangled_params`]), the field names against the parameter
//! names in kernels/*.cu. Together: every launch passes what its kernel reads, in its order.

use anyhow::{bail, ensure, Context, Result};

use super::graph::Arg;

/// How a kernel takes a parameter: a device pointer, or a scalar of this C type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A device pointer (`T*`, `const T*`, `void*`).
    P,
    /// `unsigned int`.
    U32,
    /// `int`.
    I32,
    /// `unsigned long long`.
    U64,
    /// `float`.
    F32,
    /// `double`.
    F64,
}

/// One declared parameter list and the kernels that take it.
#[derive(Clone, Copy, Debug)]
pub struct KernelSignature {
    /// The kernels' names (their `extern "C"` symbols).
    pub kernels: &'static [&'static str],
    /// (name as in kernels/*.cu, kind), in order.
    pub params: &'static [(&'static str, ParamKind)],
}

/// The arguments of one launch of a kernel in [`KernelParams::SIGNATURE`].
pub(super) trait KernelParams {
    const SIGNATURE: KernelSignature;
    /// The arguments in the kernel's parameter order.
    fn args(&self) -> Vec<Arg>;
}

macro_rules! rust_type {
    (P) => {
        u64
    };
    (U32) => {
        u32
    };
    (I32) => {
        i32
    };
    (U64) => {
        u64
    };
    (F32) => {
        f32
    };
    (F64) => {
        f64
    };
}

/// Declares each family's struct (a field per parameter, in the kernels' order, named as in
/// kernels/*.cu), its [`KernelParams`], and [`declared_kernels`] listing them all.
macro_rules! kernel_params {
    ($(
        $(#[$doc:meta])*
        $family:ident [$($kernel:literal),+ $(,)?] { $($field:ident: $kind:ident),* $(,)? }
    )*) => {
        $(
            $(#[$doc])*
            pub(super) struct $family {
                $(pub(super) $field: rust_type!($kind),)*
            }

            impl KernelParams for $family {
                const SIGNATURE: KernelSignature = KernelSignature {
                    kernels: &[$($kernel),+],
                    params: &[$((stringify!($field), ParamKind::$kind)),*],
                };

                fn args(&self) -> Vec<Arg> {
                    vec![$(Arg::$kind(self.$field)),*]
                }
            }
        )*

        /// Every parameter list the backend launches kernels with.
        pub fn declared_kernels() -> Vec<KernelSignature> {
            vec![$(<$family as KernelParams>::SIGNATURE),*]
        }
    };
}

kernel_params! {
    /// cast.cu: `y[i] = convert(x[i])`.
    Cast ["cast_f32_to_f16", "cast_f32_to_bf16"] { x: P, y: P, n: U64 }

    /// bias_grad.cu, stage 1: column sums of row blocks, and `dout`'s 16-bit copy.
    BiasGradPartial ["bias_grad_partial"] {
        partials: P, copy: P, format: I32, dout: P, rows: U32, cols: U32,
    }

    /// bias_grad.cu, stage 2: `dbias += Σ partials`.
    BiasGradReduce ["bias_grad_reduce"] { dbias: P, partials: P, parts: U32, cols: U32 }

    /// embedding.cu forward.
    EmbeddingsForward ["embeddings_forward_f32"] {
        out: P, word: P, position: P, token_type: P, ids: P, positions: P, type_ids: P,
        rows: U32, hidden: U32,
    }

    /// embedding.cu backward.
    EmbeddingsBackward ["embeddings_backward_f32"] {
        dword: P, dposition: P, dtoken_type: P, dout: P, ids: P, positions: P, type_ids: P,
        rows: U32, hidden: U32, padding_idx: I32,
    }

    /// layernorm.cu forward, with the optional residual add and its dropout, and the optional
    /// 16-bit copy of its output.
    LayerNormForward [
        "layernorm_forward_f32", "layernorm_forward_f32_f16", "layernorm_forward_f32_bf16"
    ] {
        out: P, out_copy: P, mean: P, rstd: P, x: P, residual: P, sum: P, gamma: P, beta: P,
        rows: U32, cols: U32, eps: F32, p: F32, seed: U64, stream: U64,
    }

    /// layernorm.cu backward, stage 1: dx, the branch gradient, dgamma/dbeta partials.
    LayerNormBackward ["layernorm_backward_f32"] {
        dx: P, dbranch: P, partials: P, dout: P, x: P, mean: P, rstd: P, gamma: P,
        rows: U32, cols: U32, p: F32, seed: U64, stream: U64,
    }

    /// layernorm.cu backward, stage 2: dgamma/dbeta from the partials.
    LayerNormBackwardReduce ["layernorm_backward_reduce"] {
        dgamma: P, dbeta: P, partials: P, parts: U32, cols: U32,
    }

    /// activation.cu forward.
    ActivationForward [
        "activation_forward_f32", "activation_forward_f16", "activation_forward_bf16"
    ] { out: P, x: P, n: U64, act: I32 }

    /// activation.cu backward (the `_x_` kernels read a 16-bit `x`).
    ActivationBackward [
        "activation_backward_f32", "activation_backward_x_f16", "activation_backward_x_bf16"
    ] { dx: P, dout: P, x: P, n: U64, act: I32 }

    /// activation.cu, the pooler's tanh.
    TanhForward ["tanh_forward_f32"] { out: P, x: P, n: U64 }

    /// activation.cu, the pooler's tanh backward (from its output `y`).
    TanhBackward ["tanh_backward_f32"] { dx: P, dout: P, y: P, n: U64 }

    /// dropout.cu forward.
    DropoutForward ["dropout_forward_f32"] {
        out: P, x: P, n: U64, p: F32, seed: U64, stream: U64,
    }

    /// dropout.cu backward (the same mask, regenerated).
    DropoutBackward ["dropout_backward_f32"] {
        dx: P, dout: P, n: U64, p: F32, seed: U64, stream: U64,
    }

    /// gather.cu: each sequence's first row.
    GatherFirstTokens ["gather_first_tokens_f32"] {
        out: P, x: P, starts: P, batch: U32, hidden: U32,
    }

    /// gather.cu: the gather's backward, a scatter-add.
    ScatterFirstTokensBackward ["scatter_first_tokens_backward_f32"] {
        dx: P, dout: P, starts: P, batch: U32, hidden: U32,
    }

    /// attention.cu and attention_tc.cu forward.
    AttentionForward [
        "attention_forward_f32_d32", "attention_forward_f32_d64", "attention_forward_f32_generic",
        "attention_tc_forward_f16_d32", "attention_tc_forward_f16_d64",
        "attention_tc_forward_bf16_d32", "attention_tc_forward_bf16_d64",
        "attention_tc_forward_f16_d32_out16", "attention_tc_forward_f16_d64_out16",
        "attention_tc_forward_bf16_d32_out16", "attention_tc_forward_bf16_d64_out16",
    ] {
        out: P, lse: P, qkv: P, starts: P, rows: P, valid: P,
        heads: U32, head_dim: U32, dropout_p: F32, seed: U64, stream: U64,
    }

    /// attention.cu: `delta = rowsum(dO ∘ O)` per (row, head) (`_out_`: a 16-bit O).
    AttentionBackwardDelta [
        "attention_backward_delta_f32",
        "attention_backward_delta_out_f16", "attention_backward_delta_out_bf16",
    ] {
        delta: P, dout: P, out: P, total_rows: U32, heads: U32, head_dim: U32,
    }

    /// attention.cu and attention_tc.cu backward, dQ and dK/dV.
    AttentionBackward [
        "attention_backward_dq_f32_d32", "attention_backward_dq_f32_d64",
        "attention_backward_dq_f32_generic",
        "attention_backward_dkdv_f32_d32", "attention_backward_dkdv_f32_d64",
        "attention_backward_dkdv_f32_generic",
        "attention_tc_backward_dq_f16_d32", "attention_tc_backward_dq_f16_d64",
        "attention_tc_backward_dq_bf16_d32", "attention_tc_backward_dq_bf16_d64",
        "attention_tc_backward_dkdv_f16_d32", "attention_tc_backward_dkdv_f16_d64",
        "attention_tc_backward_dkdv_bf16_d32", "attention_tc_backward_dkdv_bf16_d64",
    ] {
        dqkv: P, dout: P, qkv: P, lse: P, delta: P, starts: P, rows: P, valid: P,
        heads: U32, head_dim: U32, dropout_p: F32, seed: U64, stream: U64,
    }

    /// loss.cu forward.
    CrossEntropyForward ["cross_entropy_forward_f32"] {
        losses: P, logits: P, labels: P, rows: U32, classes: U32, smoothing: F32,
    }

    /// loss.cu backward.
    CrossEntropyBackward ["cross_entropy_backward_f32"] {
        dlogits: P, logits: P, labels: P, rows: U32, classes: U32, smoothing: F32, scale: F32,
    }

    /// loss.cu, both in one pass (the training step).
    CrossEntropyForwardBackward ["cross_entropy_forward_backward_f32"] {
        losses: P, dlogits: P, logits: P, labels: P, rows: U32, classes: U32, smoothing: F32,
        scale: F32,
    }

    /// optim.cu: Σx² partials.
    SumSquaresPartial ["sum_squares_partial"] { partials: P, x: P, n: U64 }

    /// optim.cu: Σx² from the partials.
    SumSquaresFinalize ["sum_squares_finalize"] { out: P, partials: P, parts: U32 }

    /// optim.cu: clipping by the global norm read on the device.
    ClipByGlobalNorm ["clip_by_global_norm"] { x: P, n: U64, sumsq: P, max_norm: F32 }

    /// optim.cu: fp16 gradients unscaled and checked for inf/NaN.
    UnscaleAndCheck ["unscale_and_check"] { grads: P, n: U64, scale: P, found_inf: P }

    /// optim.cu: `x *= s[0]`.
    ScaleByDevice ["scale_by_device"] { x: P, n: U64, s: P }

    /// optim.cu: the dynamic loss scale's update.
    UpdateLossScale ["update_loss_scale"] {
        state: P, found_inf: P, growth: F32, backoff: F32, growth_interval: U32,
    }

    /// optim.cu: AdamW over a table of segments.
    AdamWUpdate ["adamw_update"] {
        param: P, grad: P, exp_avg: P, exp_avg_sq: P, segments: P, num_segments: U32,
        lr: F64, step_size: F32, one_minus_beta1: F32, beta2: F32, one_minus_beta2: F32,
        bias_correction2_sqrt: F32, eps: F32, skip: P,
    }
}

/// The kernels the backend launches (all must be in the compiled modules).
pub fn required_kernels() -> Vec<&'static str> {
    declared_kernels()
        .iter()
        .flat_map(|s| s.kernels.iter().copied())
        .collect()
}

/// The name and parameter kinds of a function from its Itanium C++ mangled name (what NVRTC
/// emits for a `__global__` function without `extern "C"`): `_Z` <length><name> <parameter
/// types>. Only what kernel parameters use is read: pointers (with const, volatile, restrict)
/// to anything, the scalar types of [`ParamKind`], class types by name and substitutions
/// (`S_`, `S0_`, …); anything else (another scalar type, a class passed by value, a nested
/// name) is an error naming it.
pub fn demangled_params(symbol: &str) -> Result<(String, Vec<ParamKind>)> {
    let rest = symbol
        .strip_prefix("_Z")
        .with_context(|| format!("{symbol}: not a mangled C++ name"))?;
    let mut d = Demangler {
        s: rest.as_bytes(),
        at: 0,
        substitutions: Vec::new(),
    };
    let name = d
        .source_name()
        .with_context(|| format!("{symbol}: no function name"))?;
    let mut kinds = Vec::new();
    while d.at < d.s.len() {
        let ty = d
            .ty()
            .with_context(|| format!("{symbol}: parameter {}", kinds.len()))?;
        match ty {
            // `f(void)`: no parameters.
            Type::Scalar(b'v') if kinds.is_empty() && d.at == d.s.len() => break,
            ty => kinds.push(
                ty.kind()
                    .with_context(|| format!("{symbol}: parameter {}", kinds.len()))?,
            ),
        }
    }
    Ok((name, kinds))
}

/// The part of a mangled type a parameter's kind depends on.
#[derive(Clone, Debug)]
enum Type {
    /// A builtin type, by its one-letter code (`j` unsigned int, `f` float, …).
    Scalar(u8),
    Pointer,
    /// A class type, by name.
    Class(String),
}

impl Type {
    fn kind(&self) -> Result<ParamKind> {
        Ok(match self {
            Type::Pointer => ParamKind::P,
            Type::Scalar(b'j') => ParamKind::U32,
            Type::Scalar(b'i') => ParamKind::I32,
            Type::Scalar(b'y') => ParamKind::U64,
            Type::Scalar(b'f') => ParamKind::F32,
            Type::Scalar(b'd') => ParamKind::F64,
            Type::Scalar(c) => bail!("the scalar type `{}` has no launch kind", *c as char),
            Type::Class(name) => bail!("the class {name} is passed by value"),
        })
    }
}

struct Demangler<'a> {
    s: &'a [u8],
    at: usize,
    /// The substitution candidates seen so far, in order (`S_` is the first).
    substitutions: Vec<Type>,
}

impl Demangler<'_> {
    fn next(&mut self) -> Result<u8> {
        let c = *self.s.get(self.at).context("the name ends in a type")?;
        self.at += 1;
        Ok(c)
    }

    /// `<length><identifier>`.
    fn source_name(&mut self) -> Result<String> {
        let digits = self.s[self.at..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        ensure!(digits > 0, "expected a length at offset {}", self.at);
        let len: usize = std::str::from_utf8(&self.s[self.at..self.at + digits])?.parse()?;
        let start = self.at + digits;
        let name = self
            .s
            .get(start..start + len)
            .context("a name longer than the symbol")?;
        self.at = start + len;
        Ok(String::from_utf8_lossy(name).into_owned())
    }

    fn ty(&mut self) -> Result<Type> {
        let c = self.next()?;
        Ok(match c {
            b'P' => {
                self.ty()?;
                self.candidate(Type::Pointer)
            }
            // A qualified type is a candidate of its own (after what it qualifies, if that is
            // one); the qualifiers do not change the kind.
            b'K' | b'V' | b'r' => {
                let inner = self.ty()?;
                self.candidate(inner)
            }
            b'0'..=b'9' => {
                self.at -= 1;
                let name = self.source_name()?;
                self.candidate(Type::Class(name))
            }
            b'S' => {
                let mut index = 0usize;
                let mut c = self.next()?;
                if c != b'_' {
                    // A base-36 sequence number, 0 for `S0_`; `S_` is the first candidate.
                    let mut n = 0usize;
                    while c != b'_' {
                        // Digits and capitals only: small letters are std:: abbreviations.
                        let digit = match c {
                            b'0'..=b'9' => c - b'0',
                            b'A'..=b'Z' => c - b'A' + 10,
                            _ => bail!("`{}` in a substitution", c as char),
                        };
                        n = n * 36 + digit as usize;
                        c = self.next()?;
                    }
                    index = n + 1;
                }
                self.substitutions.get(index).cloned().with_context(|| {
                    format!("substitution {index} of {}", self.substitutions.len())
                })?
            }
            b'v' | b'b' | b'c' | b'a' | b'h' | b's' | b't' | b'i' | b'j' | b'l' | b'm' | b'x'
            | b'y' | b'f' | b'd' | b'e' => Type::Scalar(c),
            other => bail!("the type code `{}` is not read here", other as char),
        })
    }

    fn candidate(&mut self, t: Type) -> Type {
        self.substitutions.push(t.clone());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::ParamKind::*;
    use super::*;

    #[test]
    fn demangles_what_kernels_take() {
        // void k(float*, const float*, unsigned long long, int)
        assert_eq!(
            demangled_params("_Z1kPfPKfyi").unwrap(),
            ("k".into(), vec![P, P, U64, I32])
        );
        // void cast(const float*, __half*, unsigned long long): a class pointee.
        assert_eq!(
            demangled_params("_Z4castPKfP6__halfy").unwrap().1,
            vec![P, P, U64]
        );
        // void f(void)
        assert_eq!(demangled_params("_Z1fv").unwrap(), ("f".into(), vec![]));
        assert_eq!(demangled_params("_Z1fjfd").unwrap().1, vec![U32, F32, F64]);
    }

    #[test]
    fn substitutions_stand_for_earlier_types() {
        // void k(const __half*, const __half*, __half*, unsigned): the candidates are, in
        // order, `__half` (S_), `const __half` (S0_), `const __half*` (S1_), then `__half*`.
        assert_eq!(
            demangled_params("_Z1kPK6__halfS1_PS_j").unwrap().1,
            vec![P, P, P, U32]
        );
        // void k(float*, float*, const unsigned*, const unsigned*): `S_` is float*, S0_ is
        // `const unsigned`, S1_ is `const unsigned*`.
        assert_eq!(
            demangled_params("_Z1kPfS_PKjS1_").unwrap().1,
            vec![P, P, P, P]
        );
        // A class by value through a substitution is still an error.
        let e = demangled_params("_Z1k6__halfS_").unwrap_err();
        assert!(
            format!("{e:#}").contains("__half is passed by value"),
            "{e:#}"
        );
    }

    #[test]
    fn what_kernels_do_not_take_is_an_error_naming_it() {
        for (symbol, says) in [
            ("k", "not a mangled C++ name"),
            ("_Z1kx", "`x` has no launch kind"),
            ("_Z1kPfS3_", "substitution 4 of 1"),
            ("_Z1kN2ns1TE", "type code `N`"),
            ("_Z9k", "longer than the symbol"),
            ("_Z1kP", "ends in a type"),
        ] {
            let e = demangled_params(symbol).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{symbol}: {e:#}");
        }
    }

    #[test]
    fn declarations_are_unique_and_whole() {
        let all = declared_kernels();
        let mut names = required_kernels();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a kernel is declared twice");
        for s in &all {
            assert!(!s.kernels.is_empty() && !s.params.is_empty());
        }
        // The argument list follows the declared order and kinds.
        let args = Cast { x: 1, y: 2, n: 3 }.args();
        assert_eq!(args, vec![Arg::P(1), Arg::P(2), Arg::U64(3)]);
    }
}
