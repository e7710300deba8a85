//! `causal_attention` and its gradient on the GPU: the products through cuBLAS (strided batched
//! over the heads of one batch, reading the packed `qkv [B, T, 3, H, D]` and writing `y` and
//! `dqkv` in place through their strides, so no permutation copies), the softmax and its
//! gradient as row kernels ([`super::source_nn::AttentionRows`]).
//!
//! Per batch `b` (the score buffers `[H, T, T]` are reused from batch to batch, in stream order):
//! - forward: `s = scale · q kᵀ` (f32 or f64 result), `p, lse = softmax(s)` (causal), `y = p v`;
//! - backward: `s` again, `p = exp(s − lse)`, `dv = pᵀ dy`, `dp = dy vᵀ`,
//!   `ds = p ⊙ (dp − Σ dy ⊙ y)`, `dq = scale · ds k`, `dk = scale · dsᵀ q`.
//!
//! The products compute the whole `T × T` square (twice the causal work), as an eager framework's
//! explicit attention does; cuBLAS's tensor-core products make that faster than a hand-written
//! tile kernel would be without tuning on the device.

use cudarc::driver::PushKernelArg;

use super::kernels::{output, pointer, scratch};
use super::launch::{self, Operand, RowMajorProduct};
use super::matmul::{gemm, Types};
use super::nn::accumulation;
use super::source_nn::{attention_rows_kernel, AttentionRows};
use super::{downcast, CudaDevice};
use crate::ops::attention::{CausalAttention, CausalAttentionGrad};
use crate::{DType, Error, Op, Result, Tensor, TensorMeta};

/// The sizes of one attention, `qkv [batch, time, 3, heads, head_dim]`, and how its `B·H`
/// products are issued: a loop over the smaller of `B` and `H`, each step one strided batched
/// call over the other (a single stride cannot span both axes of the packed layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// `B`.
    pub batch: usize,
    /// `T`.
    pub time: usize,
    /// `H`.
    pub heads: usize,
    /// `D`.
    pub head_dim: usize,
    /// True: the loop runs over heads and each call covers every batch; false: the reverse.
    pub loop_heads: bool,
}

/// Which matrices of one loop step a product reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matrix {
    /// Queries, keys or values (0, 1, 2) in `qkv` (or their gradients in `dqkv`): `[T, D]` per
    /// (batch, head), rows `3·H·D` apart.
    Packed(usize),
    /// `y` or `dy`: rows `H·D` apart.
    Output,
    /// A score buffer `[N, T, T]`, `N` the calls' batch count (reused by every loop step).
    Scores,
}

impl Sizes {
    /// The sizes of a packed `qkv` of these dims.
    pub fn of(op: &'static str, dims: &[usize]) -> Result<Sizes> {
        match *dims {
            [batch, time, 3, heads, head_dim] => {
                Ok(Sizes { batch, time, heads, head_dim, loop_heads: heads < batch })
            }
            _ => Err(Error::argument(op, format!("qkv must be [B, T, 3, H, D], got {dims:?}"))),
        }
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Loop steps.
    pub fn steps(&self) -> usize {
        if self.loop_heads {
            self.heads
        } else {
            self.batch
        }
    }

    /// Matrices per strided batched call (`N`).
    pub fn batched(&self) -> usize {
        if self.loop_heads {
            self.batch
        } else {
            self.heads
        }
    }

    /// The operand (strides in elements) of `matrix` in one call.
    pub fn operand(&self, matrix: Matrix) -> Operand {
        let (t, d, w) = (self.time, self.head_dim, self.width());
        match matrix {
            Matrix::Packed(_) => {
                Operand { row: 3 * w, batch: if self.loop_heads { t * 3 * w } else { d } }
            }
            Matrix::Output => Operand { row: w, batch: if self.loop_heads { t * w } else { d } },
            Matrix::Scores => Operand { row: t, batch: t * t },
        }
    }

    /// The element offset of `matrix` at loop step `step` in its tensor.
    pub fn offset(&self, matrix: Matrix, step: usize) -> usize {
        let (t, d, w) = (self.time, self.head_dim, self.width());
        match matrix {
            Matrix::Packed(part) => {
                part * w + if self.loop_heads { step * d } else { step * t * 3 * w }
            }
            Matrix::Output => {
                if self.loop_heads {
                    step * d
                } else {
                    step * t * w
                }
            }
            Matrix::Scores => 0,
        }
    }

    /// The offset of loop step `step`'s first row in `lse [B, H, T]`, and the distance between
    /// the rows of consecutive matrices of a call.
    pub fn lse(&self, step: usize) -> (usize, usize) {
        if self.loop_heads {
            (step * self.time, self.heads * self.time)
        } else {
            (step * self.heads * self.time, self.time)
        }
    }

    /// The batched product `y = op(a) · op(b)` of one loop step; `sizes` is `(m, n, k)`.
    pub fn product(
        &self,
        sizes: (usize, usize, usize),
        transpose: (bool, bool),
        (a, b, y): (Matrix, Matrix, Matrix),
    ) -> RowMajorProduct {
        let (a, b, y) = (self.operand(a), self.operand(b), self.operand(y));
        RowMajorProduct { sizes, transpose, a, b, y, batches: self.batched() }
    }
}

/// Device addresses of element 0 of the tensors an attention kernel reads and writes.
struct Buffers {
    /// `qkv` (or `dqkv` for the gradient's outputs).
    packed: u64,
    /// `y`.
    y: u64,
    /// `dy` (or `y` again in the forward).
    dy: u64,
    /// `lse`.
    lse: u64,
    /// Scores `[H, T, T]` in the accumulation type.
    scores: u64,
    /// Probabilities `[H, T, T]` in the storage type.
    probabilities: u64,
}

/// Runs `causal_attention` or `causal_attention_grad`.
pub(super) fn attention(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    metas: &[TensorMeta],
) -> Result<Vec<Tensor>> {
    let name = op.name();
    let sizes = Sizes::of(name, inputs[0].dims())?;
    let dtype = inputs[0].dtype();
    let results = metas.iter().map(|meta| output(device, meta)).collect::<Result<Vec<_>>>()?;
    if results.iter().any(|t| t.numel() == 0) {
        return Ok(results);
    }
    let heads_square = sizes.batched() * sizes.time * sizes.time;
    let scores = scratch(device, heads_square, accumulation(dtype))?;
    let probabilities = scratch(device, heads_square, dtype)?;
    let (scores, probabilities) = (pointer(&scores)?, pointer(&probabilities)?);
    if let Some(forward) = downcast::<CausalAttention>(op) {
        let (y, lse) = (pointer(&results[0])?, pointer(&results[1])?);
        let qkv = pointer(&inputs[0])?;
        let buffers = Buffers { packed: qkv, y, dy: y, lse, scores, probabilities };
        for step in 0..sizes.steps() {
            forward_step(device, &sizes, dtype, forward.scale, &buffers, step)?;
        }
    } else if let Some(grad) = downcast::<CausalAttentionGrad>(op) {
        let [qkv, y, lse, dy] = [0, 1, 2, 3].map(|i| pointer(&inputs[i]));
        let buffers = Buffers { packed: qkv?, y: y?, dy: dy?, lse: lse?, scores, probabilities };
        let dqkv = pointer(&results[0])?;
        for step in 0..sizes.steps() {
            backward_step(device, &sizes, dtype, grad.scale, (&buffers, dqkv), step)?;
        }
    } else {
        return Err(Error::argument(name, "not an attention op the GPU backend knows"));
    }
    Ok(results)
}

/// The batched products of loop step `step` on the device.
struct Product<'a> {
    device: &'a CudaDevice,
    sizes: &'a Sizes,
    step: usize,
}

impl Product<'_> {
    /// `y = alpha · op(a) · op(b)`, each matrix given as its role and its tensor's address.
    fn run(
        &self,
        types: Types,
        dims: (usize, usize, usize),
        transpose: (bool, bool),
        matrices: [(Matrix, u64); 3],
        alpha: f64,
    ) -> Result<()> {
        let [(a, ap), (b, bp), (y, yp)] = matrices;
        let product = self.sizes.product(dims, transpose, (a, b, y));
        let shape = product.shape("causal_attention")?;
        let address = |matrix: Matrix, base: u64, dtype: DType| {
            base + (self.sizes.offset(matrix, self.step) * dtype.size()) as u64
        };
        let pointers = (
            address(b, bp, types.inputs),
            address(a, ap, types.inputs),
            address(y, yp, types.output),
        );
        gemm(self.device, types, shape, pointers, (alpha, 0.0))
    }
}

fn forward_step(
    device: &CudaDevice,
    sizes: &Sizes,
    dtype: DType,
    scale: f64,
    buffers: &Buffers,
    step: usize,
) -> Result<()> {
    let (t, d) = (sizes.time, sizes.head_dim);
    let product = Product { device, sizes, step };
    let wide = Types { inputs: dtype, output: accumulation(dtype) };
    let (q, k, v) = (Matrix::Packed(0), Matrix::Packed(1), Matrix::Packed(2));
    let packed = buffers.packed;
    let scores = [(q, packed), (k, packed), (Matrix::Scores, buffers.scores)];
    product.run(wide, (t, t, d), (false, true), scores, scale)?;
    rows(device, sizes, dtype, AttentionRows::Probabilities, buffers, step)?;
    let out = [(Matrix::Scores, buffers.probabilities), (v, packed), (Matrix::Output, buffers.y)];
    product.run(Types::same(dtype), (t, d, t), (false, false), out, 1.0)
}

fn backward_step(
    device: &CudaDevice,
    sizes: &Sizes,
    dtype: DType,
    scale: f64,
    (buffers, dqkv): (&Buffers, u64),
    step: usize,
) -> Result<()> {
    let (t, d) = (sizes.time, sizes.head_dim);
    let product = Product { device, sizes, step };
    let (wide, same) = (Types { inputs: dtype, output: accumulation(dtype) }, Types::same(dtype));
    let (q, k, v) = (Matrix::Packed(0), Matrix::Packed(1), Matrix::Packed(2));
    let (packed, s, p) = (buffers.packed, buffers.scores, buffers.probabilities);
    let (scores, out) = ((Matrix::Scores, s), (Matrix::Output, buffers.dy));
    product.run(wide, (t, t, d), (false, true), [(q, packed), (k, packed), scores], scale)?;
    rows(device, sizes, dtype, AttentionRows::Recompute, buffers, step)?;
    let probabilities = (Matrix::Scores, p);
    product.run(same, (t, d, t), (true, false), [probabilities, out, (v, dqkv)], 1.0)?;
    product.run(wide, (t, t, d), (false, true), [out, (v, packed), scores], 1.0)?;
    rows(device, sizes, dtype, AttentionRows::ScoreGrad, buffers, step)?;
    product.run(same, (t, d, t), (false, false), [probabilities, (k, packed), (q, dqkv)], scale)?;
    product.run(same, (t, d, t), (true, false), [probabilities, (q, packed), (k, dqkv)], scale)
}

/// One row kernel over loop step `step`'s `N·T` score rows.
fn rows(
    device: &CudaDevice,
    sizes: &Sizes,
    dtype: DType,
    kind: AttentionRows,
    buffers: &Buffers,
    step: usize,
) -> Result<()> {
    let function = device.function(&attention_rows_kernel(kind, dtype)?)?;
    let row_count = sizes.batched() * sizes.time;
    let (lse_offset, lse_stride) = sizes.lse(step);
    let lse = buffers.lse + (lse_offset * accumulation(dtype).size()) as u64;
    let at = |base: u64| base + (sizes.offset(Matrix::Output, step) * dtype.size()) as u64;
    let (y, dy) = (at(buffers.y), at(buffers.dy));
    let output = sizes.operand(Matrix::Output);
    let (total, time, lse_stride) = (row_count as i64, sizes.time as i64, lse_stride as i64);
    let (y_stride, y_row) = (output.batch as i64, output.row as i64);
    let head_dim = sizes.head_dim as i64;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&buffers.scores).arg(&buffers.probabilities).arg(&lse).arg(&y).arg(&dy);
    args.arg(&total).arg(&time).arg(&lse_stride).arg(&y_stride).arg(&y_row).arg(&head_dim);
    device.run(args, launch::rows(row_count, sizes.time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_read_the_packed_heads_through_their_strides() {
        // B 2 ≤ H 4: the loop runs over batches, each call over the 4 heads.
        let sizes = Sizes::of("causal_attention", &[2, 5, 3, 4, 8]).expect("packed");
        assert!(!sizes.loop_heads && sizes.steps() == 2 && sizes.batched() == 4);
        assert_eq!(sizes.operand(Matrix::Packed(1)), Operand { row: 96, batch: 8 });
        assert_eq!(sizes.operand(Matrix::Output), Operand { row: 32, batch: 8 });
        assert_eq!(sizes.operand(Matrix::Scores), Operand { row: 5, batch: 25 });
        // Batch 1's keys start after batch 0's 5 rows of 96 and the 32 query columns.
        assert_eq!(sizes.offset(Matrix::Packed(1), 1), 5 * 96 + 32);
        assert_eq!(sizes.offset(Matrix::Output, 1), 5 * 32);
        assert_eq!(sizes.offset(Matrix::Scores, 1), 0, "the score buffers are reused");
        assert_eq!(sizes.lse(1), (4 * 5, 5));
        let scores = sizes.product(
            (5, 5, 8),
            (false, true),
            (Matrix::Packed(0), Matrix::Packed(1), Matrix::Scores),
        );
        let shape = scores.shape("causal_attention").expect("fits");
        assert_eq!((shape.m, shape.n, shape.k, shape.batches), (5, 5, 8, 4));
        assert_eq!(shape.leading, (96, 96, 5));
        assert_eq!(shape.strides, (8, 8, 25));
        // B 8 > H 4 (the GPT check's config): the loop runs over heads, each call over batches.
        let wide = Sizes::of("causal_attention", &[8, 128, 3, 4, 64]).expect("packed");
        assert!(wide.loop_heads && wide.steps() == 4 && wide.batched() == 8);
        assert_eq!(wide.operand(Matrix::Packed(2)), Operand { row: 768, batch: 128 * 768 });
        assert_eq!(wide.offset(Matrix::Packed(2), 3), 2 * 256 + 3 * 64);
        assert_eq!(wide.lse(3), (3 * 128, 4 * 128));
        assert!(Sizes::of("causal_attention", &[2, 5, 4, 8]).is_err());
    }

    /// Every (batch, head, t, d) of the packed q, k, v (and of y), and every lse row, is
    /// addressed exactly once over the loop steps and the calls' matrices, in both loop orders.
    #[test]
    fn every_element_is_addressed_once_by_the_strides() {
        for (batch, heads) in [(2, 3), (3, 2)] {
            let sizes = Sizes::of("causal_attention", &[batch, 4, 3, heads, 5]).expect("packed");
            let (t, d) = (sizes.time, sizes.head_dim);
            let mut packed = std::collections::BTreeSet::new();
            let mut output = std::collections::BTreeSet::new();
            let mut lse = std::collections::BTreeSet::new();
            for step in 0..sizes.steps() {
                let (lse_offset, lse_stride) = sizes.lse(step);
                for j in 0..sizes.batched() {
                    for row in 0..t {
                        assert!(lse.insert(lse_offset + j * lse_stride + row));
                        let at = |m: Matrix| {
                            let operand = sizes.operand(m);
                            sizes.offset(m, step) + j * operand.batch + row * operand.row
                        };
                        for c in 0..d {
                            for part in 0..3 {
                                assert!(packed.insert(at(Matrix::Packed(part)) + c));
                            }
                            assert!(output.insert(at(Matrix::Output) + c));
                        }
                    }
                }
            }
            let total = batch * heads * t;
            assert_eq!(
                (packed.len(), packed.last().copied()),
                (3 * total * d, Some(3 * total * d - 1))
            );
            assert_eq!((output.len(), output.last().copied()), (total * d, Some(total * d - 1)));
            assert_eq!((lse.len(), lse.last().copied()), (total, Some(total - 1)));
        }
    }
}
