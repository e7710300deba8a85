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
use super::launch::{self, GemmShape, Operand, RowMajorProduct};
use super::matmul::{gemm, Types};
use super::nn::accumulation;
use super::source_nn::AttentionRows;
use super::spec::Spec;
use super::{downcast, CudaDevice};
use crate::ops::attention::{CausalAttention, CausalAttentionGrad};
use crate::ops::{add::Add, sum::Sum};
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
#[derive(Clone, Copy, Debug)]
struct Buffers {
    /// `qkv`.
    packed: u64,
    /// `y`.
    y: u64,
    /// `dy` (or `y` again in the forward).
    dy: u64,
    /// `lse`.
    lse: u64,
    /// Scores `[N, T, T]` in the accumulation type.
    scores: u64,
    /// Probabilities `[N, T, T]` in the storage type.
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
    // With `c_attn`'s bias (the forward's second input, the gradient's fifth): an `add` of it
    // to `qkv` first, the attention of the sum, and for the gradient `dbias`, the `sum` of
    // `dqkv` over batches and positions.
    let bias_at = if downcast::<CausalAttention>(op).is_some() { 1 } else { 4 };
    if let Some(bias) = inputs.get(bias_at) {
        let add = super::kernels::forward(device, &Add, &[inputs[0].clone(), bias.clone()])?;
        let biased = super::kernels::first_output(name, add)?;
        let mut unbiased = inputs[..bias_at].to_vec();
        unbiased[0] = biased;
        if bias_at == 1 {
            return attention(device, op, &unbiased, metas);
        }
        let dqkv = attention(device, op, &unbiased, &metas[..1])?;
        let rows = Sum { axes: vec![0, 1], keepdim: false };
        let dbias = super::kernels::forward(device, &rows, &dqkv)?;
        return Ok([dqkv, dbias].concat());
    }
    let sizes = Sizes::of(name, inputs[0].dims())?;
    let dtype = inputs[0].dtype();
    let results = metas.iter().map(|meta| output(device, meta)).collect::<Result<Vec<_>>>()?;
    if results.iter().any(|t| t.numel() == 0) {
        return Ok(results);
    }
    let squares = sizes.batched() * sizes.time * sizes.time;
    let scores = scratch(device, squares, accumulation(dtype))?;
    let probabilities = scratch(device, squares, dtype)?;
    let (scores, probabilities) = (pointer(&scores)?, pointer(&probabilities)?);
    let mut issue = OnDevice(device);
    if let Some(forward) = downcast::<CausalAttention>(op) {
        let (y, lse) = (pointer(&results[0])?, pointer(&results[1])?);
        let qkv = pointer(&inputs[0])?;
        let buffers = Buffers { packed: qkv, y, dy: y, lse, scores, probabilities };
        run_forward(&mut issue, &sizes, dtype, forward.scale, &buffers)?;
    } else if let Some(grad) = downcast::<CausalAttentionGrad>(op) {
        let [qkv, y, lse, dy] = [0, 1, 2, 3].map(|i| pointer(&inputs[i]));
        let buffers = Buffers { packed: qkv?, y: y?, dy: dy?, lse: lse?, scores, probabilities };
        let dqkv = pointer(&results[0])?;
        run_backward(&mut issue, &sizes, dtype, grad.scale, (&buffers, dqkv))?;
    } else {
        return Err(Error::argument(name, "not an attention op the GPU backend knows"));
    }
    Ok(results)
}

/// The forward of every loop step.
fn run_forward(
    issue: &mut impl Issue,
    sizes: &Sizes,
    dtype: DType,
    scale: f64,
    buffers: &Buffers,
) -> Result<()> {
    for step in 0..sizes.steps() {
        Step { issue: &mut *issue, sizes, dtype, step, buffers }.forward(scale)?;
    }
    Ok(())
}

/// The backward of every loop step, writing `dqkv` (its address).
fn run_backward(
    issue: &mut impl Issue,
    sizes: &Sizes,
    dtype: DType,
    scale: f64,
    (buffers, dqkv): (&Buffers, u64),
) -> Result<()> {
    for step in 0..sizes.steps() {
        Step { issue: &mut *issue, sizes, dtype, step, buffers }.backward(scale, dqkv)?;
    }
    Ok(())
}

/// One row kernel launch: the kernel, the addresses (of the loop step's first rows) and sizes.
#[derive(Clone, Copy, Debug)]
struct RowCall {
    kind: AttentionRows,
    scores: u64,
    probabilities: u64,
    lse: u64,
    y: u64,
    dy: u64,
    rows: usize,
    time: usize,
    lse_stride: usize,
    y_stride: usize,
    y_row: usize,
    head_dim: usize,
}

/// Where a loop step's work goes: the device's stream ([`OnDevice`]), or a host emulation of
/// cuBLAS and the row kernels in the tests (so the strides, offsets and transposes of every
/// product are checked against the CPU op without a GPU).
trait Issue {
    /// One strided batched product `C = alpha · op(A) · op(B)` in cuBLAS's terms, at the
    /// addresses `(first, second, result)`.
    fn product(
        &mut self,
        types: Types,
        shape: GemmShape,
        at: (u64, u64, u64),
        alpha: f64,
    ) -> Result<()>;

    /// One row kernel of `dtype`.
    fn rows(&mut self, dtype: DType, call: RowCall) -> Result<()>;
}

/// The device's stream.
struct OnDevice<'a>(&'a CudaDevice);

impl Issue for OnDevice<'_> {
    fn product(
        &mut self,
        types: Types,
        shape: GemmShape,
        at: (u64, u64, u64),
        alpha: f64,
    ) -> Result<()> {
        gemm(self.0, types, shape, at, (alpha, 0.0))
    }

    fn rows(&mut self, dtype: DType, call: RowCall) -> Result<()> {
        let function = self.0.function(Spec::AttentionRows(call.kind, dtype))?;
        let [rows, time, lse_stride, y_stride, y_row, head_dim] =
            [call.rows, call.time, call.lse_stride, call.y_stride, call.y_row, call.head_dim]
                .map(|n| n as i64);
        let mut args = self.0.stream().launch_builder(&function);
        args.arg(&call.scores).arg(&call.probabilities).arg(&call.lse).arg(&call.y);
        args.arg(&call.dy).arg(&rows).arg(&time).arg(&lse_stride).arg(&y_stride).arg(&y_row);
        args.arg(&head_dim);
        self.0.run(args, launch::rows(call.rows, call.time))
    }
}

/// One loop step: the batched products and row kernels over its `N` (batch, head) pairs.
struct Step<'a, I: Issue> {
    issue: &'a mut I,
    sizes: &'a Sizes,
    dtype: DType,
    step: usize,
    buffers: &'a Buffers,
}

impl<I: Issue> Step<'_, I> {
    /// `y = alpha · op(a) · op(b)`, each matrix given as its role and its tensor's address.
    fn product(
        &mut self,
        wide: bool,
        dims: (usize, usize, usize),
        transpose: (bool, bool),
        [(a, ap), (b, bp), (y, yp)]: [(Matrix, u64); 3],
        alpha: f64,
    ) -> Result<()> {
        let output = if wide { accumulation(self.dtype) } else { self.dtype };
        let types = Types { inputs: self.dtype, output };
        let shape = self.sizes.product(dims, transpose, (a, b, y)).shape("causal_attention")?;
        let address = |matrix: Matrix, base: u64, dtype: DType| {
            base + (self.sizes.offset(matrix, self.step) * dtype.size()) as u64
        };
        let at =
            (address(b, bp, types.inputs), address(a, ap, types.inputs), address(y, yp, output));
        self.issue.product(types, shape, at, alpha)
    }

    fn rows(&mut self, kind: AttentionRows) -> Result<()> {
        let (sizes, buffers, step) = (self.sizes, self.buffers, self.step);
        let (lse_offset, lse_stride) = sizes.lse(step);
        let at = |base: u64| base + (sizes.offset(Matrix::Output, step) * self.dtype.size()) as u64;
        let output = sizes.operand(Matrix::Output);
        let call = RowCall {
            kind,
            scores: buffers.scores,
            probabilities: buffers.probabilities,
            lse: buffers.lse + (lse_offset * accumulation(self.dtype).size()) as u64,
            y: at(buffers.y),
            dy: at(buffers.dy),
            rows: sizes.batched() * sizes.time,
            time: sizes.time,
            lse_stride,
            y_stride: output.batch,
            y_row: output.row,
            head_dim: sizes.head_dim,
        };
        self.issue.rows(self.dtype, call)
    }

    fn forward(&mut self, scale: f64) -> Result<()> {
        let (t, d) = (self.sizes.time, self.sizes.head_dim);
        let (q, k, v) = (Matrix::Packed(0), Matrix::Packed(1), Matrix::Packed(2));
        let Buffers { packed, y, scores, probabilities, .. } = *self.buffers;
        let (scores, probabilities) = ((Matrix::Scores, scores), (Matrix::Scores, probabilities));
        self.product(true, (t, t, d), (false, true), [(q, packed), (k, packed), scores], scale)?;
        self.rows(AttentionRows::Probabilities)?;
        let out = [probabilities, (v, packed), (Matrix::Output, y)];
        self.product(false, (t, d, t), (false, false), out, 1.0)
    }

    fn backward(&mut self, scale: f64, dqkv: u64) -> Result<()> {
        let (t, d) = (self.sizes.time, self.sizes.head_dim);
        let (q, k, v) = (Matrix::Packed(0), Matrix::Packed(1), Matrix::Packed(2));
        let Buffers { packed, dy, scores, probabilities, .. } = *self.buffers;
        let (scores, p) = ((Matrix::Scores, scores), (Matrix::Scores, probabilities));
        let dy = (Matrix::Output, dy);
        self.product(true, (t, t, d), (false, true), [(q, packed), (k, packed), scores], scale)?;
        self.rows(AttentionRows::Recompute)?;
        self.product(false, (t, d, t), (true, false), [p, dy, (v, dqkv)], 1.0)?;
        self.product(true, (t, t, d), (false, true), [dy, (v, packed), scores], 1.0)?;
        self.rows(AttentionRows::ScoreGrad)?;
        self.product(false, (t, d, t), (false, false), [p, (k, packed), (q, dqkv)], scale)?;
        self.product(false, (t, d, t), (true, false), [p, (q, packed), (k, dqkv)], scale)
    }
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

    /// f64 buffers at synthetic addresses (`(index + 1) << 40` plus the byte offset), and cuBLAS
    /// (column-major, as its documentation defines the call) and the row kernels on them.
    struct Host {
        buffers: Vec<Vec<f64>>,
    }

    impl Host {
        fn address(index: usize) -> u64 {
            (index as u64 + 1) << 40
        }

        fn at(address: u64, element: usize) -> (usize, usize) {
            let byte = (address & ((1 << 40) - 1)) as usize;
            ((address >> 40) as usize - 1, byte / 8 + element)
        }

        fn read(&self, address: u64, element: usize) -> f64 {
            let (buffer, index) = Host::at(address, element);
            self.buffers[buffer][index]
        }

        fn write(&mut self, address: u64, element: usize, value: f64) {
            let (buffer, index) = Host::at(address, element);
            self.buffers[buffer][index] = value;
        }
    }

    impl Issue for Host {
        fn product(
            &mut self,
            _types: Types,
            shape: GemmShape,
            (first, second, result): (u64, u64, u64),
            alpha: f64,
        ) -> Result<()> {
            let [m, n, k] = [shape.m, shape.n, shape.k].map(|v| v as usize);
            let (lda, ldb, ldc) = shape.leading;
            let [lda, ldb, ldc] = [lda, ldb, ldc].map(|v| v as usize);
            for batch in 0..shape.batches as usize {
                let [oa, ob, oc] = [shape.strides.0, shape.strides.1, shape.strides.2]
                    .map(|stride| batch * stride as usize);
                for r in 0..m {
                    for c in 0..n {
                        let sum: f64 = (0..k)
                            .map(|x| {
                                let a =
                                    if shape.transpose_first { x + r * lda } else { r + x * lda };
                                let b =
                                    if shape.transpose_second { c + x * ldb } else { x + c * ldb };
                                self.read(first, oa + a) * self.read(second, ob + b)
                            })
                            .sum();
                        self.write(result, oc + r + c * ldc, alpha * sum);
                    }
                }
            }
            Ok(())
        }

        fn rows(&mut self, _dtype: DType, call: RowCall) -> Result<()> {
            let time = call.time;
            for row in 0..call.rows {
                let (j, t) = (row / time, row % time);
                let s: Vec<f64> =
                    (0..time).map(|c| self.read(call.scores, row * time + c)).collect();
                let lse_at = j * call.lse_stride + t;
                let p: Vec<f64> = match call.kind {
                    AttentionRows::Probabilities => {
                        let m = s[..=t].iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = s[..=t].iter().map(|v| (v - m).exp()).sum();
                        self.write(call.lse, lse_at, m + z.ln());
                        (0..time).map(|c| if c <= t { (s[c] - m).exp() / z } else { 0.0 }).collect()
                    }
                    AttentionRows::Recompute => {
                        let shift = self.read(call.lse, lse_at);
                        (0..time).map(|c| if c <= t { (s[c] - shift).exp() } else { 0.0 }).collect()
                    }
                    AttentionRows::ScoreGrad => {
                        let base = j * call.y_stride + t * call.y_row;
                        let delta: f64 = (0..call.head_dim)
                            .map(|d| self.read(call.y, base + d) * self.read(call.dy, base + d))
                            .sum();
                        (0..time)
                            .map(|c| {
                                let p = self.read(call.probabilities, row * time + c);
                                if c <= t {
                                    p * (s[c] - delta)
                                } else {
                                    0.0
                                }
                            })
                            .collect()
                    }
                };
                for (c, value) in p.into_iter().enumerate() {
                    self.write(call.probabilities, row * time + c, value);
                }
            }
            Ok(())
        }
    }

    fn values(count: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn worst(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// The exact sequence of products and row kernels the device runs, emulated on the host in
    /// f64, equals the CPU op (forward: `y` and `lse`; backward: `dqkv`) in both loop orders.
    #[test]
    fn the_issued_products_and_row_kernels_equal_the_cpu_attention() {
        use crate::{Context, Tensor};
        let context = Context::with_threads(1);
        for dims in [[2, 5, 3, 3, 4], [3, 6, 3, 2, 4]] {
            let sizes = Sizes::of("causal_attention", &dims).expect("packed");
            let scale = 0.4;
            let count: usize = dims.iter().product();
            let qkv = Tensor::from_vec(values(count, 1), dims.to_vec()).expect("qkv");
            let forward = CausalAttention { scale };
            let cpu =
                forward.forward(&context, std::slice::from_ref(&qkv)).expect("the CPU forward");
            let (y, lse) =
                (cpu[0].to_vec::<f64>().expect("y"), cpu[1].to_vec::<f64>().expect("lse"));
            let squares = sizes.batched() * sizes.time * sizes.time;
            let qkv_values = qkv.to_vec::<f64>().expect("qkv");
            let mut host = Host {
                buffers: vec![
                    qkv_values.clone(),
                    vec![0.0; y.len()],
                    vec![0.0; lse.len()],
                    vec![f64::NAN; squares],
                    vec![f64::NAN; squares],
                ],
            };
            let [qkv_at, y_at, lse_at, scores, probabilities] = [0, 1, 2, 3, 4].map(Host::address);
            let buffers =
                Buffers { packed: qkv_at, y: y_at, dy: y_at, lse: lse_at, scores, probabilities };
            run_forward(&mut host, &sizes, DType::F64, scale, &buffers).expect("emulated");
            assert!(worst(&host.buffers[1], &y) < 1e-12, "y of {dims:?}");
            assert!(worst(&host.buffers[2], &lse) < 1e-12, "lse of {dims:?}");

            let dy = values(y.len(), 2);
            let grad = CausalAttentionGrad { scale };
            let dy_tensor = Tensor::from_vec(dy.clone(), cpu[0].dims().to_vec()).expect("dy");
            let inputs = [qkv, cpu[0].clone(), cpu[1].clone(), dy_tensor];
            let dqkv = grad.forward(&context, &inputs).expect("the CPU backward").remove(0);
            let mut host = Host {
                buffers: vec![
                    qkv_values,
                    y,
                    lse,
                    dy,
                    vec![f64::NAN; squares],
                    vec![f64::NAN; squares],
                    vec![f64::NAN; count],
                ],
            };
            let [qkv_at, y_at, lse_at, dy_at, scores, probabilities, dqkv_at] =
                [0, 1, 2, 3, 4, 5, 6].map(Host::address);
            let buffers =
                Buffers { packed: qkv_at, y: y_at, dy: dy_at, lse: lse_at, scores, probabilities };
            run_backward(&mut host, &sizes, DType::F64, scale, (&buffers, dqkv_at))
                .expect("emulated");
            let expected = dqkv.to_vec::<f64>().expect("dqkv");
            assert!(worst(&host.buffers[6], &expected) < 1e-12, "dqkv of {dims:?}");
        }
    }
}
