//! Every op of `meshflow-ops` as a method of [`Tensor`]. Each method applies the op's
//! constructor on the tensor's graph; shape, dtype and placement errors come back at once,
//! naming the op and the shapes.

use meshflow_ops::ops::unary::Differentiable;
use meshflow_ops::ops::{
    add, add_scalar, attention, bias_act, cast, concat, cross_entropy, div, dropout, embedding,
    exp, fill, gelu, layer_norm, log, log_softmax, masked_fill, matmul, max, mean, mul, mul_scalar,
    narrow, neg, permute, pow, pow_scalar, relu, reshape, rms_norm, rsqrt, sigmoid, silu,
    skip_layer_norm, softmax, split, sqrt, sub, sum, tanh, where_select,
};
use meshflow_ops::{DType, Emit, Shape, Value};

use super::Tensor;
use crate::{Error, Result};

type Unary = fn(&mut dyn Emit, Value) -> meshflow_ops::Result<Value>;
type Binary = fn(&mut dyn Emit, Value, Value) -> meshflow_ops::Result<Value>;

impl Tensor {
    fn unary(&self, f: Unary) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| f(e, x))
    }

    fn binary(&self, other: &Tensor, f: Binary) -> Result<Tensor> {
        let (x, y) = (self.value(), self.same_graph(other)?);
        self.emit_with(|e| f(e, x, y))
    }

    fn same_graph(&self, other: &Tensor) -> Result<Value> {
        if self.graph().same(other.graph()) {
            Ok(other.value())
        } else {
            Err(Error::Graph(format!("{self:?} and {other:?} belong to different graphs")))
        }
    }

    /// `self + other`, with broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, add::add)
    }

    /// `self − other`, with broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, sub::sub)
    }

    /// `self · other` element-wise, with broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, mul::mul)
    }

    /// `self / other` element-wise, with broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, div::div)
    }

    /// `self ^ other` element-wise, with broadcasting.
    pub fn pow(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, pow::pow)
    }

    /// Matrix product (2-D, batched, or batched × 2-D weight).
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, matmul::matmul)
    }

    /// Matrix product with either operand transposed (its last two axes).
    pub fn matmul_t(&self, other: &Tensor, transpose_a: bool, transpose_b: bool) -> Result<Tensor> {
        let (a, b) = (self.value(), self.same_graph(other)?);
        self.emit_with(|e| matmul::matmul_transposed(e, a, b, transpose_a, transpose_b))
    }

    /// `self + value`.
    pub fn add_scalar(&self, value: f64) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| add_scalar::add_scalar(e, x, value))
    }

    /// `self · value`.
    pub fn mul_scalar(&self, value: f64) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| mul_scalar::mul_scalar(e, x, value))
    }

    /// `self ^ exponent`.
    pub fn pow_scalar(&self, exponent: f64) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| pow_scalar::pow_scalar(e, x, exponent))
    }

    /// `−self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(neg::neg)
    }

    /// `e^self`.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(exp::exp)
    }

    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(log::log)
    }

    /// Square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(sqrt::sqrt)
    }

    /// `1 / sqrt(self)`.
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(rsqrt::rsqrt)
    }

    /// `max(self, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(relu::relu)
    }

    /// GELU, exact (erf) or with the tanh approximation.
    pub fn gelu(&self, tanh_approximation: bool) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| gelu::gelu(e, x, tanh_approximation))
    }

    /// `gelu(self + bias)` for `self [..., C]` and `bias [C]`, in one pass (`bias_gelu`; its
    /// gradient gives the bias gradient in the same pass as `self`'s).
    pub fn bias_gelu(&self, bias: &Tensor, tanh_approximation: bool) -> Result<Tensor> {
        self.bias_act(bias, gelu::Gelu { tanh: tanh_approximation })
    }

    /// `relu(self + bias)` in one pass, as [`Tensor::bias_gelu`] (`bias_relu`).
    pub fn bias_relu(&self, bias: &Tensor) -> Result<Tensor> {
        self.bias_act(bias, relu::Relu)
    }

    /// `silu(self + bias)` in one pass, as [`Tensor::bias_gelu`] (`bias_silu`).
    pub fn bias_silu(&self, bias: &Tensor) -> Result<Tensor> {
        self.bias_act(bias, silu::Silu)
    }

    fn bias_act<P: Differentiable>(&self, bias: &Tensor, f: P) -> Result<Tensor> {
        let (x, b) = (self.value(), self.same_graph(bias)?);
        self.emit_with(|e| bias_act::bias_act(e, f, x, b))
    }

    /// `self · sigmoid(self)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(silu::silu)
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(tanh::tanh)
    }

    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(sigmoid::sigmoid)
    }

    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Tensor> {
        self.unary(softmax::softmax)
    }

    /// Log-softmax over the last axis.
    pub fn log_softmax(&self) -> Result<Tensor> {
        self.unary(log_softmax::log_softmax)
    }

    /// Sum over `axes` (negative axes count from the end).
    pub fn sum(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| sum::sum(e, x, axes, keepdim))
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| mean::mean(e, x, axes, keepdim))
    }

    /// Maximum over `axes`.
    pub fn max(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| max::max(e, x, axes, keepdim))
    }

    /// The same elements in another shape.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let (x, shape) = (self.value(), shape.into());
        self.emit_with(|e| reshape::reshape(e, x, &shape))
    }

    /// Axes reordered: output axis `i` is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| permute::permute(e, x, perm))
    }

    /// Axes `a` and `b` swapped.
    pub fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| permute::transpose(e, x, a, b))
    }

    /// `len` elements of `axis` from `start`.
    pub fn narrow(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| narrow::narrow(e, x, axis, start, len))
    }

    /// Pieces of `axis` of the given sizes.
    pub fn split(&self, axis: isize, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let x = self.value();
        self.emit_many(|e| split::split(e, x, axis, sizes))
    }

    /// Concatenation of `tensors` along `axis`.
    pub fn concat(tensors: &[&Tensor], axis: isize) -> Result<Tensor> {
        let first = tensors.first().ok_or_else(|| Error::Graph("concat of no tensors".into()))?;
        let values = tensors.iter().map(|t| first.same_graph(t)).collect::<Result<Vec<_>>>()?;
        first.emit_with(|e| concat::concat(e, &values, axis))
    }

    /// `self` where `mask` is false, `value` where it is true (mask broadcasts).
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        let (x, m) = (self.value(), self.same_graph(mask)?);
        self.emit_with(|e| masked_fill::masked_fill(e, x, m, value))
    }

    /// `cond ? self : other` element-wise.
    pub fn where_(&self, cond: &Tensor, other: &Tensor) -> Result<Tensor> {
        let (x, c, y) = (self.value(), self.same_graph(cond)?, self.same_graph(other)?);
        self.emit_with(|e| where_select::where_select(e, c, x, y))
    }

    /// Element type converted to `dtype`.
    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| cast::cast(e, x, dtype))
    }

    /// A tensor of the same shape and dtype filled with `value`.
    pub fn fill(&self, value: f64) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| fill::fill(e, x, value))
    }

    /// Dropout with probability `p` and a mask fixed by `seed` (the same at every step).
    pub fn dropout(&self, p: f64, seed: u64) -> Result<Tensor> {
        let x = self.value();
        self.emit_with(|e| dropout::dropout(e, x, p, seed))
    }

    /// Dropout with probability `p` whose mask is a function of `(seed, step, logical index)`:
    /// new at every training step (it reads the graph's [`crate::Graph::step_counter`] of this
    /// placement), and the same on one device, any mesh and any number of micro-batches.
    pub fn dropout_per_step(&self, p: f64, seed: u64) -> Result<Tensor> {
        let step = self.graph().step_counter(&self.placement())?.value();
        let x = self.value();
        self.emit_with(|e| dropout::dropout_at_step(e, x, step, p, seed))
    }

    /// Layer normalisation over the last axis with affine `weight` and `bias`.
    pub fn layer_norm(&self, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let (x, w, b) = (self.value(), self.same_graph(weight)?, self.same_graph(bias)?);
        self.emit_with(|e| layer_norm::layer_norm(e, x, w, b, eps))
    }

    /// The residual junction of a pre-norm transformer in one op (`skip_layer_norm`): with
    /// `self` the residual stream and `y` a branch's output before its `bias`, returns the new
    /// stream `s = self + (y + bias)` and its layer normalisation `layer_norm(s)` with `weight`,
    /// `norm_bias` and `eps`. The same values as `self.add(&y.add(bias)?)` and a
    /// [`Tensor::layer_norm`] of that, in two passes over the rows instead of three (and two
    /// instead of three in the backward).
    pub fn skip_layer_norm(
        &self,
        y: &Tensor,
        bias: &Tensor,
        (weight, norm_bias): (&Tensor, &Tensor),
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let x = self.value();
        let (y, bias) = (self.same_graph(y)?, self.same_graph(bias)?);
        let (weight, norm_bias) = (self.same_graph(weight)?, self.same_graph(norm_bias)?);
        let outputs = self.emit_many(|e| {
            skip_layer_norm::skip_layer_norm(e, (x, y), bias, (weight, norm_bias), eps)
        })?;
        match <[Tensor; 2]>::try_from(outputs) {
            Ok([sum, normed]) => Ok((sum, normed)),
            Err(outputs) => {
                Err(Error::Graph(format!("skip_layer_norm gave {} outputs, not 2", outputs.len())))
            }
        }
    }

    /// RMS normalisation over the last axis with `weight`.
    pub fn rms_norm(&self, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let (x, w) = (self.value(), self.same_graph(weight)?);
        self.emit_with(|e| rms_norm::rms_norm(e, x, w, eps))
    }

    /// Rows of this table (`[V, D]`) gathered by the i64 `ids`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let (table, ids) = (self.value(), self.same_graph(ids)?);
        self.emit_with(|e| embedding::embedding(e, table, ids))
    }

    /// Fused causal attention of packed `[B, T, 3, H, D]` queries, keys and values (the
    /// `c_attn` output viewed per head) plus `bias [3, H, D]` when given (`c_attn`'s bias,
    /// added as the kernel reads them instead of in a pass of its own): `[B, T, H, D]`,
    /// `softmax(scale · q kᵀ, causal) · v`.
    pub fn causal_attention(&self, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        let qkv = self.value();
        let bias = bias.map(|b| self.same_graph(b)).transpose()?;
        self.emit_with(|e| attention::causal_attention(e, qkv, bias, scale))
    }

    /// Mean cross-entropy of these logits (`[N, C]`) against i64 targets (`[N]`).
    pub fn cross_entropy(&self, targets: &Tensor) -> Result<Tensor> {
        let (logits, targets) = (self.value(), self.same_graph(targets)?);
        self.emit_with(|e| cross_entropy::cross_entropy(e, logits, targets))
    }
}
