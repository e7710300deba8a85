//! `matmul`: `y = op(a) · op(b)` where `op` transposes the last two axes when the op's flag says
//! so; 2-D, batched (`[..., M, K] × [..., K, N]`), and one operand 2-D against a batched other
//! (the weight case `[..., M, K] × [K, N]`). Runs through the `gemm` crate on the context's
//! threads; bf16 and f16 are computed in f32 (widened, multiplied with f32 accumulation, rounded).
//!
//! [`MatMulSumBatch`] (`y = Σ_b op(a_b) · op(b_b)`) is the gradient of the operand that was
//! broadcast over the batch.

use meshflow_placement::{Sbp, Signature};

use super::matmul_kernel::{run_product, Product};
use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Matrix product with optional transposes of either operand.
///
/// Signatures for 2-D `a [M, K]`, `b [K, N]` (axes move with the transpose flags), per device `d`:
/// - `S(0), B -> S(0)`: `y_d = a_d · b` on the rows of `a` that `d` holds;
/// - `B, S(1) -> S(1)`: `y_d = a · b_d` on the columns of `b`;
/// - `S(1), S(0) -> P`: `y = Σ_d a_d · b_d` over the split contraction axis;
/// - `P, B -> P` and `B, P -> P`: the product is linear in each operand;
/// - `B, B -> B`.
///
/// Batched operands also split on any batch axis (`S(i), S(i) -> S(i)`; with a 2-D operand,
/// `S(i), B -> S(i)`), and the `M`, `K`, `N` splits above move to the last two axes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatMul {
    /// Use `aᵀ` (the last two axes of `a` swapped).
    pub transpose_a: bool,
    /// Use `bᵀ` (the last two axes of `b` swapped).
    pub transpose_b: bool,
}

/// Applies [`MatMul`] without transposes.
pub fn matmul(e: &mut dyn Emit, a: Value, b: Value) -> Result<Value> {
    emit1(e, MatMul::default(), &[a, b])
}

/// Applies [`MatMul`] with transpose flags.
pub fn matmul_transposed(
    e: &mut dyn Emit,
    a: Value,
    b: Value,
    transpose_a: bool,
    transpose_b: bool,
) -> Result<Value> {
    emit1(e, MatMul { transpose_a, transpose_b }, &[a, b])
}

impl Op for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let plan = Plan::new(self.name(), inputs, (self.transpose_a, self.transpose_b))?;
        let mut dims = plan.batch.clone();
        dims.extend([plan.m, plan.n]);
        Ok(vec![TensorMeta::new(dims, inputs[0].dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas = [inputs[0].meta().clone(), inputs[1].meta().clone()];
        let plan = Plan::new(self.name(), &metas, (self.transpose_a, self.transpose_b))?;
        let out = self.infer(&metas)?.remove(0);
        Ok(vec![run_product(ctx, self.name(), &plan.product(false), inputs, out)?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        match Plan::new(self.name(), inputs, (self.transpose_a, self.transpose_b)) {
            Ok(plan) => plan.signatures(false),
            Err(_) => vec![Signature::broadcast(2, 1)],
        }
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        self.backward_needed(e, (inputs, outputs), grads, &[true, true])
    }

    fn backward_needed(
        &self,
        e: &mut dyn Emit,
        (inputs, _): (&[Value], &[Value]),
        grads: &[Option<Value>],
        needed: &[bool],
    ) -> Result<Vec<Option<Value>>> {
        product_backward(e, inputs, grads, (self.transpose_a, self.transpose_b), needed)
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        Plan::new(self.name(), inputs, (self.transpose_a, self.transpose_b))
            .map_or(0, |plan| plan.flops())
    }

    fn matrix_flops(&self, inputs: &[TensorMeta]) -> u64 {
        self.flops(inputs)
    }
}

/// `y = Σ_b op(a_b) · op(b_b)`: a batched product summed over the (equal) batch axes of both
/// operands, giving a 2-D result. It is the gradient of a 2-D operand of [`MatMul`] that was
/// broadcast against a batched one.
///
/// Signatures: those of 2-D [`MatMul`] on the last two axes, plus `S(i), S(i) -> P` on every
/// batch axis `i` (each device sums over the batches it holds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatMulSumBatch {
    /// Use `a_bᵀ`.
    pub transpose_a: bool,
    /// Use `b_bᵀ`.
    pub transpose_b: bool,
}

impl Op for MatMulSumBatch {
    fn name(&self) -> &'static str {
        "matmul_sum_batch"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let plan = Plan::new(self.name(), inputs, (self.transpose_a, self.transpose_b))?;
        if plan.a_batched != plan.b_batched {
            let shapes = [&inputs[0].shape, &inputs[1].shape];
            return Err(Error::shape(self.name(), &shapes, "both operands must be batched alike"));
        }
        Ok(vec![TensorMeta::new([plan.m, plan.n], inputs[0].dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas = [inputs[0].meta().clone(), inputs[1].meta().clone()];
        let out = self.infer(&metas)?.remove(0);
        let plan = Plan::new(self.name(), &metas, (self.transpose_a, self.transpose_b))?;
        Ok(vec![run_product(ctx, self.name(), &plan.product(true), inputs, out)?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        match Plan::new(self.name(), inputs, (self.transpose_a, self.transpose_b)) {
            Ok(plan) => plan.signatures(true),
            Err(_) => vec![Signature::broadcast(2, 1)],
        }
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        self.backward_needed(e, (inputs, outputs), grads, &[true, true])
    }

    fn backward_needed(
        &self,
        e: &mut dyn Emit,
        (inputs, _): (&[Value], &[Value]),
        grads: &[Option<Value>],
        needed: &[bool],
    ) -> Result<Vec<Option<Value>>> {
        product_backward(e, inputs, grads, (self.transpose_a, self.transpose_b), needed)
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        Plan::new(self.name(), inputs, (self.transpose_a, self.transpose_b))
            .map_or(0, |plan| plan.flops())
    }

    fn matrix_flops(&self, inputs: &[TensorMeta]) -> u64 {
        self.flops(inputs)
    }
}

/// The gradients of a product op (either kind) with transpose flags `transposes`: none without
/// an output gradient, else [`product_grads`] for the operands in `needed`.
fn product_backward(
    e: &mut dyn Emit,
    inputs: &[Value],
    grads: &[Option<Value>],
    transposes: (bool, bool),
    needed: &[bool],
) -> Result<Vec<Option<Value>>> {
    let Some(g) = grads[0] else { return Ok(vec![None, None]) };
    product_grads(e, (inputs[0], inputs[1]), g, transposes, needed)
}

/// Gradients of `y = op(a)·op(b)` (batched or not) from `g = ∂L/∂y`, each itself a product with
/// transpose flags; a 2-D operand whose partner is batched gets a [`MatMulSumBatch`].
/// Only the operands `needed` says get one (the product of a constant or an input's
/// gradient is not built).
fn product_grads(
    e: &mut dyn Emit,
    (a, b): (Value, Value),
    g: Value,
    (ta, tb): (bool, bool),
    needed: &[bool],
) -> Result<Vec<Option<Value>>> {
    // For each case, (lhs, rhs, transpose lhs, transpose rhs) of the product that gives the grad.
    let grad_a = match (ta, tb) {
        (false, false) => (g, b, false, true),
        (false, true) => (g, b, false, false),
        (true, false) => (b, g, false, true),
        (true, true) => (b, g, true, true),
    };
    let grad_b = match (ta, tb) {
        (false, false) => (a, g, true, false),
        (false, true) => (g, a, true, false),
        (true, false) => (a, g, false, false),
        (true, true) => (g, a, true, true),
    };
    let rank_a = e.meta(a).shape.rank();
    let rank_b = e.meta(b).shape.rank();
    let wanted = |i: usize| needed.get(i).copied().unwrap_or(true);
    let da = wanted(0).then(|| product(e, grad_a, rank_a == 2 && rank_b > 2)).transpose()?;
    let db = wanted(1).then(|| product(e, grad_b, rank_b == 2 && rank_a > 2)).transpose()?;
    Ok(vec![da, db])
}

fn product(
    e: &mut dyn Emit,
    (lhs, rhs, transpose_a, transpose_b): (Value, Value, bool, bool),
    sum_batch: bool,
) -> Result<Value> {
    if sum_batch {
        emit1(e, MatMulSumBatch { transpose_a, transpose_b }, &[lhs, rhs])
    } else {
        emit1(e, MatMul { transpose_a, transpose_b }, &[lhs, rhs])
    }
}

/// Shapes of one product: batch axes, sizes, which operand is batched, transposes.
#[derive(Clone, Debug)]
struct Plan {
    batch: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    a_batched: bool,
    b_batched: bool,
    transpose: (bool, bool),
}

impl Plan {
    fn new(op: &'static str, inputs: &[TensorMeta], transpose: (bool, bool)) -> Result<Plan> {
        let [a, b] = inputs else {
            return Err(Error::Arity { op, expected: 2, got: inputs.len() });
        };
        if a.dtype != b.dtype || !a.dtype.is_float() {
            return Err(Error::dtype(
                op,
                &[a.dtype, b.dtype],
                "needs two operands of one float dtype",
            ));
        }
        let shapes = [&a.shape, &b.shape];
        let (ad, bd) = (a.shape.dims(), b.shape.dims());
        if ad.len() < 2 || bd.len() < 2 {
            return Err(Error::shape(op, &shapes, "operands need at least 2 axes"));
        }
        let (a_batch, a_mat) = ad.split_at(ad.len() - 2);
        let (b_batch, b_mat) = bd.split_at(bd.len() - 2);
        let (m, ka) = if transpose.0 { (a_mat[1], a_mat[0]) } else { (a_mat[0], a_mat[1]) };
        let (kb, n) = if transpose.1 { (b_mat[1], b_mat[0]) } else { (b_mat[0], b_mat[1]) };
        if ka != kb {
            let reason =
                format!("contraction sizes differ ({ka} vs {kb}; transposes {transpose:?})");
            return Err(Error::shape(op, &shapes, reason));
        }
        let batch = match (a_batch.is_empty(), b_batch.is_empty()) {
            (_, true) => a_batch.to_vec(),
            (true, false) => b_batch.to_vec(),
            (false, false) if a_batch == b_batch => a_batch.to_vec(),
            (false, false) => {
                return Err(Error::shape(
                    op,
                    &shapes,
                    "batch axes differ (no broadcasting of batches)",
                ))
            }
        };
        let (a_batched, b_batched) = (!a_batch.is_empty(), !b_batch.is_empty());
        Ok(Plan { batch, m, k: ka, n, a_batched, b_batched, transpose })
    }

    fn batches(&self) -> usize {
        self.batch.iter().product()
    }

    fn flops(&self) -> u64 {
        2 * (self.batches() * self.m * self.n * self.k) as u64
    }

    /// Strides for the kernel.
    fn product(&self, sum_batch: bool) -> Product {
        let (m, k, n) = (self.m, self.k, self.n);
        // Row-major [rows, cols] storage: op(x)[i, j] at i·rs + j·cs.
        let (a_rs, a_cs) = if self.transpose.0 { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if self.transpose.1 { (1, k) } else { (n, 1) };
        Product {
            batches: self.batches(),
            m,
            n,
            k,
            a: (a_rs, a_cs, if self.a_batched { m * k } else { 0 }),
            b: (b_rs, b_cs, if self.b_batched { k * n } else { 0 }),
            sum_batch,
        }
    }

    /// Signatures of the product; `sum_batch`: the output has no batch axes.
    fn signatures(&self, sum_batch: bool) -> Vec<Signature> {
        let (ra, rb) = (
            self.batch.len() * self.a_batched as usize,
            self.batch.len() * self.b_batched as usize,
        );
        let ro = if sum_batch { 0 } else { self.batch.len() };
        // Axis of M and K in a, of K and N in b.
        let (a_m, a_k) = if self.transpose.0 { (ra + 1, ra) } else { (ra, ra + 1) };
        let (b_k, b_n) = if self.transpose.1 { (rb + 1, rb) } else { (rb, rb + 1) };
        let sig = |a: Sbp, b: Sbp, y: Sbp| Signature::new([a, b], [y]);
        let (bc, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![
            sig(bc, bc, bc),
            sig(Sbp::Split(a_m), bc, Sbp::Split(ro)),
            sig(bc, Sbp::Split(b_n), Sbp::Split(ro + 1)),
            sig(Sbp::Split(a_k), Sbp::Split(b_k), p),
            sig(p, bc, p),
            sig(bc, p, p),
        ];
        for i in 0..self.batch.len() {
            let out = if sum_batch { p } else { Sbp::Split(i) };
            let a = if self.a_batched { Sbp::Split(i) } else { bc };
            let b = if self.b_batched { Sbp::Split(i) } else { bc };
            signatures.push(sig(a, b, out));
        }
        signatures
    }
}
