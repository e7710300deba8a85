//! The CPU kernel of [`super::attention`]: fused causal attention and its gradient.
//!
//! One task per (batch, head), spread over the context's threads; each task runs alone on its
//! thread. Inside a task the query rows go in blocks of [`ROW_BLOCK`]: a block of rows
//! `[r0, r1)` only meets keys `[0, r1)` (the rest of the upper triangle is masked), so each
//! product is `rows × r1`, read from the packed `qkv` through its strides (no gather, no
//! permutation copies): in f32 on AVX-512 CPUs straight on the `gemm-f32` microkernels
//! ([`tiles`]), which also skip most of the masked half of the block's diagonal ([`Causal`]),
//! otherwise through single-threaded `gemm` calls. The block's scores (at most
//! `ROW_BLOCK × T`) stay in cache between the products and the softmax. f32 and f64 run
//! natively; bf16 and f16 are widened to f32 and the results rounded back.

use gemm::Parallelism;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::attention::lse_dtype;
use super::nn_rows::{map_sum, max, sum_map2, Accumulate, RowFloat};
use super::softmax::nonpositive_shift;
use crate::cpu::layout::transpose_rows;
use crate::cpu::simd::multiversion;
use crate::{Context, DType, Element, Error, Result, Tensor, TensorMeta};

/// Query rows per block: the block's scores and probabilities (`2 · ROW_BLOCK · T` elements)
/// stay in L2, and the causal skip wastes at most half a block per row block (the tiles skip
/// most of that half too). With that skip, blocks of 48 and 64 rows ran level with 32 (GPT
/// reference heads, one and two threads, five alternations on a noisy host).
const ROW_BLOCK: usize = 32;

/// The sizes of one attention: `qkv [batch, time, 3, heads, head_dim]` and the score factor.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Geometry {
    /// `B`.
    pub batch: usize,
    /// `T`.
    pub time: usize,
    /// `H`.
    pub heads: usize,
    /// `D`.
    pub head_dim: usize,
    /// The factor of the scores.
    pub scale: f64,
}

impl Geometry {
    /// Checks `qkv` (a float `[B, T, 3, H, D]` with `D > 0`) and `scale` (finite).
    pub fn of(op: &'static str, qkv: &TensorMeta, scale: f64) -> Result<Geometry> {
        if !qkv.dtype.is_float() {
            return Err(Error::dtype(
                op,
                &[qkv.dtype],
                "needs a float dtype (f32, f64, bf16, f16)",
            ));
        }
        let &[batch, time, three, heads, head_dim] = qkv.shape.dims() else {
            let reason = "qkv must be [batch, time, 3, heads, head_dim]";
            return Err(Error::shape(op, &[&qkv.shape], reason));
        };
        if three != 3 || head_dim == 0 {
            let reason = "qkv must be [batch, time, 3, heads, head_dim] with head_dim > 0";
            return Err(Error::shape(op, &[&qkv.shape], reason));
        }
        if !scale.is_finite() {
            return Err(Error::argument(op, format!("the score scale {scale} is not finite")));
        }
        Ok(Geometry { batch, time, heads, head_dim, scale })
    }

    /// The meta of `y [B, T, H, D]`.
    pub fn y_meta(&self, dtype: DType) -> TensorMeta {
        TensorMeta::new([self.batch, self.time, self.heads, self.head_dim], dtype)
    }

    /// The meta of `lse [B, H, T]`.
    pub fn lse_meta(&self, dtype: DType) -> TensorMeta {
        TensorMeta::new([self.batch, self.heads, self.time], lse_dtype(dtype))
    }

    /// The meta of the optional bias `[3, H, D]` (of `q`, `k` and `v`, added to `qkv`).
    pub fn bias_meta(&self, dtype: DType) -> TensorMeta {
        TensorMeta::new([3, self.heads, self.head_dim], dtype)
    }

    /// `B · H`, the number of independent attentions.
    pub fn heads_total(&self) -> u64 {
        (self.batch * self.heads) as u64
    }

    /// Score elements per head that the row blocks compute, and the causal ones among them
    /// (`T (T + 1) / 2`). The tiles compute 7–16 % fewer ([`Causal`]); the count is the row
    /// blocks', which `gemm` computes whole.
    pub fn score_elements(&self) -> (u64, u64) {
        let computed = self.blocks().map(|(start, end)| (end - start) * end).sum::<usize>();
        (computed as u64, (self.time * (self.time + 1) / 2) as u64)
    }

    /// The row blocks `[start, end)` in order.
    fn blocks(&self) -> impl DoubleEndedIterator<Item = (usize, usize)> {
        let time = self.time;
        (0..time.div_ceil(ROW_BLOCK)).map(move |i| (i * ROW_BLOCK, ((i + 1) * ROW_BLOCK).min(time)))
    }

    /// `H · D`: the row stride of `y` and the distance between `q`, `k` and `v` in `qkv`.
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// `(y, lse)` of packed `qkv`, with `bias [3, H, D]` added to it first when given.
pub(crate) fn forward(
    ctx: &Context,
    g: &Geometry,
    qkv: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let dtype = qkv.dtype();
    let (y_meta, lse_meta) = (g.y_meta(dtype), g.lse_meta(dtype));
    let mut y = Tensor::for_overwrite(ctx, y_meta.shape, dtype);
    let mut lse = Tensor::for_overwrite(ctx, lse_meta.shape, lse_meta.dtype);
    match dtype {
        DType::F32 => {
            let bias = bias.map(Tensor::as_slice::<f32>).transpose()?;
            let outputs = (y.as_mut_slice()?, lse.as_mut_slice()?);
            forward_into::<f32>(ctx, g, (qkv.as_slice()?, bias), outputs)
        }
        DType::F64 => {
            let bias = bias.map(Tensor::as_slice::<f64>).transpose()?;
            let outputs = (y.as_mut_slice()?, lse.as_mut_slice()?);
            forward_into::<f64>(ctx, g, (qkv.as_slice()?, bias), outputs)
        }
        DType::BF16 => half_forward::<bf16>(ctx, g, (qkv, bias), &mut y, &mut lse)?,
        DType::F16 => half_forward::<f16>(ctx, g, (qkv, bias), &mut y, &mut lse)?,
        other => return Err(Error::dtype("causal_attention", &[other], "needs a float dtype")),
    }
    Ok((y, lse))
}

/// `dqkv` from packed `qkv`, the forward's `y`, `lse` and the gradient `dy` of `y`; with the
/// forward's `bias`, also `dbias [3, H, D]`, the sums of `dqkv` over batches and positions.
pub(crate) fn backward(
    ctx: &Context,
    g: &Geometry,
    (qkv, bias): (&Tensor, Option<&Tensor>),
    (y, lse, dy): (&Tensor, &Tensor, &Tensor),
) -> Result<(Tensor, Option<Tensor>)> {
    let dtype = qkv.dtype();
    let mut dqkv = Tensor::for_overwrite(ctx, qkv.shape().clone(), dtype);
    let bias_meta = g.bias_meta(dtype);
    let mut dbias = bias.map(|_| Tensor::for_overwrite(ctx, bias_meta.shape, dtype));
    match dtype {
        DType::F32 => {
            native_backward::<f32>(ctx, g, (qkv, bias), (y, lse, dy), &mut dqkv, &mut dbias)?
        }
        DType::F64 => {
            native_backward::<f64>(ctx, g, (qkv, bias), (y, lse, dy), &mut dqkv, &mut dbias)?
        }
        DType::BF16 => {
            half_backward::<bf16>(ctx, g, (qkv, bias), [y, lse, dy], &mut dqkv, &mut dbias)?
        }
        DType::F16 => {
            half_backward::<f16>(ctx, g, (qkv, bias), [y, lse, dy], &mut dqkv, &mut dbias)?
        }
        other => {
            return Err(Error::dtype("causal_attention_grad", &[other], "needs a float dtype"))
        }
    }
    Ok((dqkv, dbias))
}

/// The backward of f32 and f64, in the tensors' own storage.
fn native_backward<T: Real>(
    ctx: &Context,
    g: &Geometry,
    (qkv, bias): (&Tensor, Option<&Tensor>),
    (y, lse, dy): (&Tensor, &Tensor, &Tensor),
    dqkv: &mut Tensor,
    dbias: &mut Option<Tensor>,
) -> Result<()> {
    let bias = bias.map(Tensor::as_slice::<T>).transpose()?;
    let dbias = dbias.as_mut().map(Tensor::as_mut_slice::<T>).transpose()?;
    let inputs = (qkv.as_slice()?, y.as_slice()?, lse.as_slice()?, dy.as_slice()?);
    backward_into::<T>(ctx, g, inputs, bias, (dqkv.as_mut_slice()?, dbias));
    Ok(())
}

/// The forward of a 16-bit float: computed in f32, `y` rounded back (`lse` is f32 already).
fn half_forward<H: Element>(
    ctx: &Context,
    g: &Geometry,
    (qkv, bias): (&Tensor, Option<&Tensor>),
    y: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()>
where
    [H]: HalfFloatSliceExt,
{
    let wide = qkv.as_slice::<H>()?.to_f32_vec();
    let bias = bias.map(|b| b.as_slice::<H>().map(|b| b.to_f32_vec())).transpose()?;
    let mut y_wide = vec![0.0f32; y.numel()];
    let inputs = (wide.as_slice(), bias.as_deref());
    forward_into::<f32>(ctx, g, inputs, (&mut y_wide, lse.as_mut_slice()?));
    y.as_mut_slice::<H>()?.convert_from_f32_slice(&y_wide);
    Ok(())
}

/// The backward of a 16-bit float: computed in f32, `dqkv` (and `dbias`) rounded back.
fn half_backward<H: Element>(
    ctx: &Context,
    g: &Geometry,
    (qkv, bias): (&Tensor, Option<&Tensor>),
    [y, lse, dy]: [&Tensor; 3],
    dqkv: &mut Tensor,
    dbias: &mut Option<Tensor>,
) -> Result<()>
where
    [H]: HalfFloatSliceExt,
{
    let (qkv, y, dy) = (
        qkv.as_slice::<H>()?.to_f32_vec(),
        y.as_slice::<H>()?.to_f32_vec(),
        dy.as_slice::<H>()?.to_f32_vec(),
    );
    let bias = bias.map(|b| b.as_slice::<H>().map(|b| b.to_f32_vec())).transpose()?;
    let mut wide = vec![0.0f32; dqkv.numel()];
    let mut bias_wide = dbias.as_ref().map(|d| vec![0.0f32; d.numel()]);
    let inputs = (qkv.as_slice(), y.as_slice(), lse.as_slice()?, dy.as_slice());
    backward_into::<f32>(ctx, g, inputs, bias.as_deref(), (&mut wide, bias_wide.as_deref_mut()));
    dqkv.as_mut_slice::<H>()?.convert_from_f32_slice(&wide);
    if let (Some(out), Some(wide)) = (dbias.as_mut(), bias_wide) {
        out.as_mut_slice::<H>()?.convert_from_f32_slice(&wide);
    }
    Ok(())
}

/// A float the kernel computes in natively (f32, f64): its own accumulate type, and a `gemm`
/// element.
pub(crate) trait Real: RowFloat<Acc = Self> + Accumulate {
    /// Runs [`product`] through [`tiles`] where this type has them: false when it does not, or
    /// when the operands do not fit them.
    ///
    /// # Safety
    /// As [`product`].
    unsafe fn tile_product(
        _out: (*mut Self, usize),
        _sizes: (usize, usize, usize),
        _lhs: View<Self>,
        _rhs: View<Self>,
        _beta: Self,
        _accumulate: bool,
        _causal: Causal,
    ) -> bool {
        false
    }

    /// Runs [`softmax_block`] in explicit vectors where this type has them: false, having done
    /// nothing, when it does not.
    fn softmax_vectors(
        _scores: &[Self],
        _offset: Option<&[Self]>,
        _probabilities: &mut [Self],
        _lse: &mut [Self],
        _first_row: usize,
        _width: usize,
    ) -> bool {
        false
    }
}

impl Real for f32 {
    fn softmax_vectors(
        scores: &[f32],
        offset: Option<&[f32]>,
        probabilities: &mut [f32],
        lse: &mut [f32],
        first_row: usize,
        width: usize,
    ) -> bool {
        rows::softmax_block(scores, offset, probabilities, lse, first_row, width)
    }

    unsafe fn tile_product(
        out: (*mut f32, usize),
        sizes: (usize, usize, usize),
        lhs: View<f32>,
        rhs: View<f32>,
        beta: f32,
        accumulate: bool,
        causal: Causal,
    ) -> bool {
        // SAFETY: forwarded from the caller.
        unsafe { tiles::product(out, sizes, lhs, rhs, beta, accumulate, causal) }
    }
}

impl Real for f64 {}

/// A raw pointer that tasks share; each writes elements no other task touches.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);

// SAFETY: tasks write disjoint elements through it (each its own batch and head).
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Shared<T> {}

/// Runs `task(scratch, index)` for every (batch, head) index, in parallel within `ctx`'s
/// budget, with one [`Scratch`] per run of consecutive tasks on a thread instead of one per task
/// (allocating and zeroing two blocks per head was 4% of the kernels' time: `perf`).
fn for_each_head<T: Real>(
    ctx: &Context,
    g: &Geometry,
    task: impl Fn(&mut Scratch<T>, usize) + Sync + Send,
) {
    let tasks = g.batch * g.heads;
    if ctx.threads() == 1 || tasks <= 1 {
        let mut scratch = Scratch::new(g);
        (0..tasks).for_each(|index| task(&mut scratch, index));
    } else {
        ctx.install(|| (0..tasks).into_par_iter().for_each_init(|| Scratch::new(g), task));
    }
}

fn forward_into<T: Real>(
    ctx: &Context,
    g: &Geometry,
    (qkv, bias): (&[T], Option<&[T]>),
    (y, lse): (&mut [T], &mut [T]),
) {
    let total = g.batch * g.time * g.heads;
    assert!(qkv.len() == 3 * total * g.head_dim, "causal_attention: qkv is not {g:?}");
    assert!(y.len() == total * g.head_dim && lse.len() == total, "causal_attention: outputs");
    assert!(bias.is_none_or(|b| b.len() == 3 * g.width()), "causal_attention: bias");
    let (y, lse) = (Shared(y.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    for_each_head(ctx, g, |scratch, task| {
        // SAFETY: the lengths were checked above; task `task` writes only its own head's rows
        // of `y` and its own `lse` row.
        unsafe { forward_head(g, task, (qkv.as_ptr(), bias), (y, lse), scratch) }
    });
}

fn backward_into<T: Real>(
    ctx: &Context,
    g: &Geometry,
    (qkv, y, lse, dy): (&[T], &[T], &[T], &[T]),
    bias: Option<&[T]>,
    (dqkv, dbias): (&mut [T], Option<&mut [T]>),
) {
    let total = g.batch * g.time * g.heads;
    assert!(qkv.len() == 3 * total * g.head_dim && dqkv.len() == qkv.len(), "qkv is not {g:?}");
    assert!(y.len() == total * g.head_dim && dy.len() == y.len(), "y, dy are not {g:?}");
    assert!(lse.len() == total, "causal_attention_grad: lse is not {g:?}");
    let width = g.width();
    assert!(bias.is_none_or(|b| b.len() == 3 * width), "causal_attention_grad: bias");
    assert!(dbias.as_ref().is_none_or(|d| d.len() == 3 * width), "causal_attention_grad: dbias");
    // Each (batch, head)'s column sums of its `dq`, `dk` and `dv` rows, `[B·H, 3, D]`.
    let mut partial = vec![T::zero(); if dbias.is_some() { 3 * g.batch * width } else { 0 }];
    let sums = dbias.is_some().then_some(Shared(partial.as_mut_ptr()));
    let dqkv = Shared(dqkv.as_mut_ptr());
    for_each_head(ctx, g, |scratch, task| {
        let inputs = (qkv.as_ptr(), y.as_ptr(), lse.as_ptr(), dy.as_ptr());
        // SAFETY: the lengths were checked above; task `task` writes only its own head's
        // elements of `dqkv` and its own `3·D` column sums.
        unsafe { backward_head(g, task, (inputs, bias), (dqkv, sums), scratch) }
    });
    if let Some(dbias) = dbias {
        // dbias[c, h, :] = Σ_b partial[b, h, c, :], the batches in order.
        dbias.fill(T::zero());
        let d = g.head_dim;
        for (task, sums) in partial.chunks_exact(3 * d).enumerate() {
            let head = task % g.heads;
            for (c, sums) in sums.chunks_exact(d).enumerate() {
                let out = &mut dbias[c * width + head * d..][..d];
                out.iter_mut().zip(sums).for_each(|(o, &s)| *o += s);
            }
        }
    }
}

/// Buffers of one row block: scores and probabilities (forward), probabilities and score
/// gradients (backward), and the row dot products `Σ dy ⊙ y`. A head overwrites every element
/// it reads, so consecutive heads on a thread share one.
struct Scratch<T> {
    first: Vec<T>,
    second: Vec<T>,
    dots: Vec<T>,
    /// The head's keys, transposed ([`transpose_head`]).
    keys: Vec<T>,
    /// The head's values, transposed (backward only: sized there, like `dots`).
    values: Vec<T>,
    /// With a bias: the scores' starting row `c` (`[T]`).
    row: Vec<T>,
    /// With a bias: the column sums of `ds` over the row blocks (backward, `[T]`).
    column_sums: Vec<T>,
    /// Ones (at least `T` of them): the column `[T, 1]` or row `[1, T]` of the sums and of
    /// the bias rows that start a block.
    unit: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new(g: &Geometry) -> Self {
        let block = ROW_BLOCK.min(g.time) * g.time;
        let head = g.time * g.head_dim;
        Scratch {
            first: vec![T::zero(); block],
            second: vec![T::zero(); block],
            dots: Vec::new(),
            keys: vec![T::zero(); head],
            values: Vec::new(),
            row: Vec::new(),
            column_sums: Vec::new(),
            unit: Vec::new(),
        }
    }

    /// `n` ones as a `[n, 1]` column (or, transposed, a `[1, n]` row).
    fn ones(&mut self, n: usize) -> View<T> {
        if self.unit.len() < n {
            self.unit.resize(n, T::one());
        }
        View { pointer: self.unit.as_ptr(), row: 1, column: 1 }
    }
}

/// `out[j·T + t] = m[t, j] (+ bias[j])` for one head's `T × D` keys or values `m` (rows
/// `3·H·D` apart in `qkv`), and the view of `mᵀ [D, T]` it makes. A product against `mᵀ` reads
/// its rows as vectors in place (the microkernels, and `gemm`, compute the row-major scores
/// transposed); read through the strides of `qkv` it was packed again, element by element, for
/// every row block (a fifth of the fused attention's time: `perf`, GPT reference heads).
///
/// # Safety
/// `m` must reach `T × D` elements.
unsafe fn transpose_head<T: Real>(
    m: View<T>,
    (time, dim): (usize, usize),
    bias: Option<&[T]>,
    out: &mut [T],
) -> View<T> {
    // SAFETY: forwarded from the caller (`T` rows of `D` elements, `m.row` apart).
    unsafe { transpose_rows(m.pointer, m.row, (time, dim), out) };
    if let Some(bias) = bias {
        for (row, &b) in out.chunks_exact_mut(time.max(1)).zip(bias) {
            row.iter_mut().for_each(|v| *v += b);
        }
    }
    View { pointer: out.as_ptr(), row: time, column: 1 }
}

/// `c = scale · b_q (k + b_k)ᵀ` into `c` (resized to `T`): what the queries' bias adds to
/// every row of a head's scores, from the keys' transposed copy `[D, T]` (which holds `b_k`).
///
/// # Safety
/// `keys` must reach `D × T` elements, rows `T` apart.
unsafe fn score_row<T: Real>(g: &Geometry, b_q: &[T], keys: View<T>, c: &mut Vec<T>) {
    c.resize(g.time, T::zero());
    let sizes = (1, g.time, g.head_dim);
    // SAFETY: `c` holds `T`; `b_q` is `[1, D]`; the keys the caller's contract.
    unsafe {
        product((c.as_mut_ptr(), g.time), sizes, row(b_q), keys, T::constant(g.scale), false)
    };
}

/// A bias part (`[D]`) as a `[1, D]` matrix.
fn row<T>(values: &[T]) -> View<T> {
    View::dense(values, values.len())
}

/// A strided matrix: element `(i, j)` at `pointer + i·row + j·column`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pointer: *const T,
    row: usize,
    column: usize,
}

impl<T> View<T> {
    /// A row-major matrix with rows of `width`.
    fn dense(values: &[T], width: usize) -> Self {
        View { pointer: values.as_ptr(), row: width, column: 1 }
    }

    /// The transpose (a change of strides).
    fn transposed(self) -> Self {
        View { row: self.column, column: self.row, ..self }
    }

    /// The matrix from row `start` on.
    fn rows_from(self, start: usize) -> Self {
        View { pointer: self.pointer.wrapping_add(start * self.row), ..self }
    }
}

/// Where one head of one batch lives in the packed tensors.
struct Head<T> {
    q: View<T>,
    k: View<T>,
    v: View<T>,
    /// Offset of the head's first element of `q` in `qkv` (of `k`, `v`: plus `H·D`, `2·H·D`).
    qkv_offset: usize,
    /// Offset of the head's first element in `y`.
    y_offset: usize,
}

/// Head `task`'s part `c` (0: `q`, 1: `k`, 2: `v`) of a bias `[3, H, D]`.
fn bias_part<'a, T>(g: &Geometry, task: usize, bias: &'a [T], c: usize) -> &'a [T] {
    let start = c * g.width() + (task % g.heads) * g.head_dim;
    &bias[start..start + g.head_dim]
}

impl<T> Head<T> {
    fn new(g: &Geometry, task: usize, qkv: *const T) -> Self {
        let (batch, head) = (task / g.heads, task % g.heads);
        let width = g.width();
        let qkv_offset = batch * g.time * 3 * width + head * g.head_dim;
        let view =
            |offset: usize| View { pointer: qkv.wrapping_add(offset), row: 3 * width, column: 1 };
        Head {
            q: view(qkv_offset),
            k: view(qkv_offset + width),
            v: view(qkv_offset + 2 * width),
            qkv_offset,
            y_offset: batch * g.time * width + head * g.head_dim,
        }
    }
}

/// One (batch, head) of the forward. With a bias, none of `q`, `k`, `v` is copied with its
/// bias added: the keys' bias goes into their transposed copy, the queries' into each block of
/// scores as the row `c = scale · b_q (k + b_k)ᵀ` added to each of its rows, and the values'
/// into each output row as `b_v` (a row of probabilities sums to 1, so `p (v + b_v) = p v +
/// b_v`). Copies of `q` and `v` with their biases cost as much as the add they replace
/// (`bench train --ops`), and so did starting each block from `c` or `b_v` through the
/// microkernels (criterion `train_f32/gpt/causal_attention_bias`: 904 µs against 776 without
/// a bias).
///
/// # Safety
/// `qkv` holds `g`'s packed tensor, `y` and `lse` the outputs; no other task writes head `task`.
unsafe fn forward_head<T: Real>(
    g: &Geometry,
    task: usize,
    (qkv, bias): (*const T, Option<&[T]>),
    (y, lse): (Shared<T>, Shared<T>),
    scratch: &mut Scratch<T>,
) {
    let head = Head::new(g, task, qkv);
    let (d, width, scale, one) = (g.head_dim, g.width(), T::constant(g.scale), T::one());
    // SAFETY: row `task` of `lse [B·H, T]` belongs to this task.
    let lse = unsafe { std::slice::from_raw_parts_mut(lse.0.add(task * g.time), g.time) };
    let part = |c: usize| bias.map(|b| bias_part(g, task, b, c));
    // SAFETY: the head's keys lie inside `qkv`.
    let keys = unsafe { transpose_head(head.k, (g.time, d), part(1), &mut scratch.keys) };
    let mut c = std::mem::take(&mut scratch.row);
    let starts = part(0).zip(part(2)).map(|(b_q, b_v)| {
        // SAFETY: the keys are the head's transposed `[D, T]`.
        unsafe { score_row(g, b_q, keys, &mut c) };
        (c.as_slice(), b_v)
    });
    for (start, end) in g.blocks() {
        let size = (end - start) * end;
        let (scores, probabilities) = (&mut scratch.first[..size], &mut scratch.second[..size]);
        let rows = end - start;
        let out = (scores.as_mut_ptr(), end);
        // SAFETY: the views stay inside `qkv` (rows < T, columns < D); the block holds
        // `rows × end`.
        unsafe {
            let q = head.q.rows_from(start);
            causal_product(out, (rows, end, d), q, keys, scale, false, Causal::Columns(start))
        };
        let offset = starts.map(|(c, _)| &c[..end]);
        let lse = &mut lse[start..end];
        if !T::softmax_vectors(scores, offset, probabilities, lse, start, end) {
            softmax_block(scores, offset, probabilities, lse, start, end);
        }
        let out = (y.0.wrapping_add(head.y_offset + start * width), width);
        let p = View::dense(probabilities, end);
        // SAFETY: rows `start..end` of this head of `y` belong to this task.
        unsafe {
            causal_product(out, (rows, d, end), p, head.v, one, false, Causal::Depth(start));
            if let Some((_, b_v)) = starts {
                for r in 0..rows {
                    add_to_rows(std::slice::from_raw_parts_mut(out.0.add(r * width), d), b_v);
                }
            }
        }
    }
    scratch.row = c;
}

/// One (batch, head) of the backward. Row blocks run last to first: the last block meets every
/// key, so its `dk`, `dv` products write every row and the earlier blocks accumulate.
///
/// With a bias, as in [`forward_head`] nothing is copied, and its gradient comes from sums the
/// blocks make anyway or nearly so, into the head's `3·D` slot of `sums`:
/// - the scores get `c` as in the forward, and `dp = dy · (v + b_v)ᵀ` reads the values'
///   transposed copy, which holds `b_v`;
/// - `dk = scale · dsᵀ (q + b_q)`: the product with `q`, then once per head `scale · s ⊗ b_q`,
///   where `s` (`[T]`) sums the columns of `ds` over every row block;
/// - `dq = scale · ds (k + b_k) = scale · ds k`: each row of `ds` sums to 0 (`Σ_j p_j (dp_j −
///   Σ_l p_l dp_l) = 0`), so `b_k` adds nothing, and for the same reason its gradient is 0;
/// - `db_q = Σ_i dq_i = scale · s (k + b_k)`; `db_v = Σ_t dv_t = Σ_i dy_i`, as every row of
///   the probabilities sums to 1.
///
/// # Safety
/// The pointers hold `g`'s tensors; no other task writes head `task` of `dqkv` or its slot of
/// `sums` (`[B·H, 3, D]`).
unsafe fn backward_head<T: Real>(
    g: &Geometry,
    task: usize,
    ((qkv, y, lse, dy), bias): ((*const T, *const T, *const T, *const T), Option<&[T]>),
    (dqkv, sums): (Shared<T>, Option<Shared<T>>),
    scratch: &mut Scratch<T>,
) {
    let head = Head::new(g, task, qkv);
    let (d, width, scale, one) = (g.head_dim, g.width(), T::constant(g.scale), T::one());
    let y = View { pointer: y.wrapping_add(head.y_offset), row: width, column: 1 };
    let dy = View { pointer: dy.wrapping_add(head.y_offset), ..y };
    // SAFETY: row `task` of `lse [B·H, T]`, and rows of `D` elements of `y`, `dy` in bounds.
    let lse = unsafe { std::slice::from_raw_parts(lse.add(task * g.time), g.time) };
    let span = if g.time == 0 { 0 } else { (g.time - 1) * width + d };
    // SAFETY: this head's rows of `y` and `dy` lie in `span` elements from its first one.
    let (y_rows, dy_rows) = unsafe {
        (std::slice::from_raw_parts(y.pointer, span), std::slice::from_raw_parts(dy.pointer, span))
    };
    scratch.dots.resize(g.time, T::zero());
    row_dots(y_rows, dy_rows, width, &mut scratch.dots);
    let out = |offset: usize| (dqkv.0.wrapping_add(head.qkv_offset + offset), 3 * width);
    let (dq, dk, dv) = (out(0), out(width), out(2 * width));
    scratch.values.resize(g.time * d, T::zero());
    let part = |c: usize| bias.map(|b| bias_part(g, task, b, c));
    // SAFETY: the head's keys and values lie inside `qkv`.
    let (keys, values) = unsafe {
        (
            transpose_head(head.k, (g.time, d), part(1), &mut scratch.keys),
            transpose_head(head.v, (g.time, d), part(2), &mut scratch.values),
        )
    };
    let biased = bias.is_some();
    let ones = scratch.ones(g.time);
    if let Some(b_q) = part(0) {
        // SAFETY: the keys are the head's transposed `[D, T]`.
        unsafe { score_row(g, b_q, keys, &mut scratch.row) };
        scratch.column_sums.clear();
        scratch.column_sums.resize(g.time, T::zero());
    }
    for (start, end) in g.blocks().rev() {
        let (rows, size) = (end - start, (end - start) * end);
        let (p, ds) = (&mut scratch.first[..size], &mut scratch.second[..size]);
        let accumulate = end < g.time;
        // SAFETY: views inside their tensors (rows < T, columns < D) and the scratch; the
        // block holds `rows × end`; rows `0..end` of this head's `dq`, `dk`, `dv` belong to
        // this task.
        unsafe {
            let q = head.q.rows_from(start);
            let columns = Causal::Columns(start);
            causal_product((p.as_mut_ptr(), end), (rows, end, d), q, keys, scale, false, columns);
            let dy_rows = dy.rows_from(start);
            let out = (ds.as_mut_ptr(), end);
            causal_product(out, (rows, end, d), dy_rows, values, one, false, columns);
            let dots = &scratch.dots[start..end];
            let offset = biased.then(|| &scratch.row[..end]);
            gradient_block(p, offset, ds, &lse[start..end], dots, start, end);
            let (p, ds) = (View::dense(p, end), View::dense(ds, end));
            if biased {
                let sums = (scratch.column_sums.as_mut_ptr(), end);
                product(sums, (1, end, rows), ones, ds, one, true);
            }
            let (keys_first, depth) = (Causal::DepthFrom(start), Causal::Depth(start));
            causal_product(
                dv,
                (end, d, rows),
                p.transposed(),
                dy_rows,
                one,
                accumulate,
                keys_first,
            );
            causal_product(dk, (end, d, rows), ds.transposed(), q, scale, accumulate, keys_first);
            let dq = (dq.0.wrapping_add(start * 3 * width), dq.1);
            causal_product(dq, (rows, d, end), ds, head.k, scale, false, depth);
        }
    }
    let (Some(b_q), Some(sums)) = (part(0), sums) else { return };
    let s = View::dense(&scratch.column_sums, g.time);
    // SAFETY: slot `task` of `sums` belongs to this task; `s` is `[1, T]` (a `[T, 1]` column
    // transposed), `b_q` `[1, D]`, the keys `[D, T]` (`[T, D]` transposed), `dy` `T` rows of
    // `D`; rows `0..T` of this head's `dk` belong to this task.
    unsafe {
        product(dk, (g.time, d, 1), s.transposed(), row(b_q), scale, true);
        let slot = std::slice::from_raw_parts_mut(sums.0.add(task * 3 * d), 3 * d);
        let (db_q, rest) = slot.split_at_mut(d);
        let (db_k, db_v) = rest.split_at_mut(d);
        // `s (k + b_k) = s k + (Σ s) b_k`: the keys in place (a microkernel row, where their
        // transposed copy went through `gemm`'s packing, a third of the bias's cost).
        product((db_q.as_mut_ptr(), d), (1, d, g.time), s, head.k, scale, false);
        if let Some(b_k) = part(1) {
            let total = scratch.column_sums.iter().fold(T::zero(), |a, &v| a + v) * scale;
            db_q.iter_mut().zip(b_k).for_each(|(o, &b)| *o += total * b);
        }
        db_k.fill(T::zero());
        product((db_v.as_mut_ptr(), d), (1, d, g.time), ones, dy, one, false);
    }
}

multiversion! {
    /// `values[i · n + j] += row[j]` for each row of `n = row.len()` values (a bias row added
    /// to a block of scores, or to one row of `y`).
    fn add_to_rows<T: Real>(values: &mut [T], row: &[T]) {
        for chunk in values.chunks_exact_mut(row.len().max(1)) {
            chunk.iter_mut().zip(row).for_each(|(v, &r)| *v += r);
        }
    }
}

multiversion! {
    /// `dots[t] = Σ_j a[t, j] · b[t, j]` over rows `width` apart, each `D` long (`a` holds
    /// `(dots.len() − 1) · width + D` elements; `b` likewise).
    fn row_dots<T: Real>(a: &[T], b: &[T], width: usize, dots: &mut [T]) {
        let len = a.len() + width - dots.len() * width;
        for (t, dot) in dots.iter_mut().enumerate() {
            let row = t * width..t * width + len;
            *dot = sum_map2(&a[row.clone()], &b[row], |x, y| x * y);
        }
    }
}

/// The columns a row with `valid` causal entries runs its vector loops over: `valid` rounded up
/// to whole vectors of 16 lanes (at most `width`), the entries past `valid` set to −∞ so that
/// they come out as exact zeros. Without it every row ended in a scalar tail of up to 15
/// exponentials, a quarter of the forward's time (`perf`, GPT reference heads of 64).
fn padded(valid: usize, width: usize) -> usize {
    valid.next_multiple_of(16).min(width)
}

multiversion! {
    /// Softmax of each causal row of a block of `scores` (rows of `width`, the block's first row
    /// is `first_row`), each row plus `offset` (`[width]`, the queries' bias term `c`) where
    /// given: row `i` keeps its first `first_row + i + 1` scores, the rest are masked
    /// (overwritten with −∞ up to [`padded`]; they need not have been written). Writes the
    /// probabilities (zeros where masked) and each row's log-sum-exp.
    fn softmax_block<T: Real>(
        scores: &mut [T],
        offset: Option<&[T]>,
        probabilities: &mut [T],
        lse: &mut [T],
        first_row: usize,
        width: usize,
    ) {
        let rows = scores.chunks_exact_mut(width).zip(probabilities.chunks_exact_mut(width));
        for (index, ((scores, probabilities), lse)) in rows.zip(lse.iter_mut()).enumerate() {
            let valid = first_row + index + 1;
            let padded = padded(valid, width);
            if let Some(offset) = offset {
                scores[..valid].iter_mut().zip(offset).for_each(|(s, &c)| *s += c);
            }
            scores[valid..padded].fill(T::neg_infinity());
            let (kept, masked) = probabilities.split_at_mut(padded);
            let scores = &scores[..padded];
            let peak = nonpositive_shift(max(scores));
            let total = map_sum(scores, kept, |s| (s - peak).exp_nonpositive::<FUSED>());
            let inverse = T::one() / total;
            kept.iter_mut().for_each(|p| *p *= inverse);
            kept[valid..].fill(T::zero()); // exact zeros even where `inverse` is not finite
            masked.fill(T::zero());
            *lse = peak + total.ln();
        }
    }
}

multiversion! {
    /// From a block of scores (each row plus `offset`, `[width]`, where given) and of
    /// `dp = dy vᵀ` (rows of `width` from row `first_row`), in place: `p = e^(s − lse)` and
    /// `ds = p ⊙ (dp − dot)` on the causal entries, zeros on the masked ones (the loop runs to
    /// [`padded`] over scores set to −∞ past the causal ones; they need not have been written).
    fn gradient_block<T: Real>(
        scores: &mut [T],
        offset: Option<&[T]>,
        dp: &mut [T],
        lse: &[T],
        dots: &[T],
        first_row: usize,
        width: usize,
    ) {
        let rows = scores.chunks_exact_mut(width).zip(dp.chunks_exact_mut(width));
        for (index, ((p, ds), (&lse, &dot))) in rows.zip(lse.iter().zip(dots)).enumerate() {
            let valid = first_row + index + 1;
            let padded = padded(valid, width);
            p[valid..padded].fill(T::neg_infinity());
            let entries = p[..padded].iter_mut().zip(ds[..padded].iter_mut());
            if let Some(offset) = offset {
                // `(s + c) − lse`: the scores and their bias term added first, as when `c` was
                // added to the block in a pass of its own.
                for ((p, ds), &c) in entries.zip(offset) {
                    let probability = (*p + c - lse).exp_nonpositive::<FUSED>();
                    *p = probability;
                    *ds = probability * (*ds - dot);
                }
            } else {
                for (p, ds) in entries {
                    let probability = (*p - lse).exp_nonpositive::<FUSED>();
                    *p = probability;
                    *ds = probability * (*ds - dot);
                }
            }
            // Exact zeros on the masked entries, whatever `lse` and `dp` hold.
            p[valid..].fill(T::zero());
            ds[valid..].fill(T::zero());
        }
    }
}

/// `out (+)= beta · lhs · rhs` with `lhs [m, k]`, `rhs [k, n]` and `out = (pointer, row stride)`
/// of unit column stride, on the calling thread; `accumulate`: add to `out`'s elements instead
/// of overwriting them.
///
/// # Safety
/// Every element the strides reach must lie inside live buffers; `out` may not overlap the
/// operands and must be writable by this task alone.
unsafe fn product<T: Real>(
    out: (*mut T, usize),
    sizes: (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
    accumulate: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe { causal_product(out, sizes, lhs, rhs, beta, accumulate, Causal::Full) }
}

/// What the causal mask lets a product of the attention skip. The row blocks already skip
/// the keys past a block's last query; inside a block the tiles skip, strip by strip of
/// [`tiles::STRIP`] rows, what the mask zeroes or what is never read: in the GPT reference
/// heads (`T` 128, blocks of 32) that is 7–16 % of each product's multiply-adds (the
/// diagonal halves of the blocks). `gemm`, which serves the products that do not fit the
/// tiles, computes them whole: every product below is correct whole as well.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Causal {
    /// Every element.
    Full,
    /// `out`'s row `r` holds query `first + r`, and only its columns up to `first + r` are read
    /// afterwards: later columns may be left unwritten (the scores, `dp`).
    Columns(usize),
    /// `lhs`'s row `r` holds query `first + r`, and is zero past column `first + r` (the
    /// probabilities, `ds`): the depth may stop there (`y`, `dq`).
    Depth(usize),
    /// `lhs`'s row `j` holds key `j` and its depth `i` query `first + i`; it is zero where the
    /// query precedes the key (`pᵀ`, `dsᵀ`): the depth may start at the first query that
    /// meets the row (`dv`, `dk`).
    DepthFrom(usize),
}

/// [`product`], allowed to skip what `causal` says.
///
/// # Safety
/// As [`product`]; in addition, what `causal` says of the operands and of `out` must hold.
#[allow(clippy::too_many_arguments)]
unsafe fn causal_product<T: Real>(
    (out, out_row): (*mut T, usize),
    (m, n, k): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
    accumulate: bool,
    causal: Causal,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: forwarded from the caller.
    if unsafe { T::tile_product((out, out_row), (m, n, k), lhs, rhs, beta, accumulate, causal) } {
        return;
    }
    let stride = |s: usize| s as isize;
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            stride(out_row),
            accumulate,
            lhs.pointer,
            stride(lhs.column),
            stride(lhs.row),
            rhs.pointer,
            stride(rhs.column),
            stride(rhs.row),
            T::one(),
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The attention's f32 softmax rows in AVX-512 vectors. The generic [`softmax_block`] keeps
/// its lane sums in memory (a store and a load on every vector of a row, `perf annotate`) and
/// folds them through the stack, twice per row: on rows of 32 to 128 scores that was most of
/// its time, 31 % of the forward (session 17's `perf`). Here the lanes stay in registers and fold in shuffles. The
/// same operations in the same order (the maxima and sums lane by lane, folded in halves, the
/// exponential's polynomial with the same multiply-adds), so the results are bit for bit those
/// of the generic loop compiled for AVX-512 (a test holds them to it). The GPT reference
/// heads (`[8, 128, 3, 4, 64]`, one thread, best of 15 × 10 calls, four alternating runs):
/// forward 899-919 -> 758-815 µs; in the GPT step (`bench train --ops`, 2 threads, three
/// alternating pairs) `causal_attention` 3.02-3.20 -> 2.71-2.93 ms.
mod rows {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// [`super::softmax_block`] for f32 when the CPU has AVX-512 and `width` is whole vectors;
    /// false, having done nothing, otherwise.
    pub(super) fn softmax_block(
        scores: &[f32],
        offset: Option<&[f32]>,
        probabilities: &mut [f32],
        lse: &mut [f32],
        first_row: usize,
        width: usize,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let rows = lse.len();
            // The CPU the generic loop's x86-64-v4 version runs on, the one it must match.
            if !crate::cpu::simd::has_x86_v4()
                || width == 0
                || !width.is_multiple_of(16)
                || scores.len() < rows * width
                || probabilities.len() < rows * width
                || offset.is_some_and(|o| o.len() < width)
            {
                return false;
            }
            // SAFETY: the CPU has AVX-512F and FMA (x86-64-v4); the slices hold `rows` rows of
            // `width`, a whole number of vectors, and `offset` one row.
            unsafe { block(scores, offset, probabilities, lse, first_row, width) };
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (scores, offset, probabilities, lse, first_row, width);
            false
        }
    }

    /// # Safety
    /// As [`softmax_block`] checks: AVX-512F and FMA, `width` a positive multiple of 16, the
    /// slices `lse.len()` rows of it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn block(
        scores: &[f32],
        offset: Option<&[f32]>,
        probabilities: &mut [f32],
        lse: &mut [f32],
        first_row: usize,
        width: usize,
    ) {
        let rows = scores.chunks_exact(width).zip(probabilities.chunks_exact_mut(width));
        for (index, ((scores, probabilities), lse)) in rows.zip(lse.iter_mut()).enumerate() {
            let valid = first_row + index + 1;
            let vectors = super::padded(valid, width) / 16;
            // SAFETY (every `at`): vector `c < vectors` lies inside the row, and inside
            // `offset` (a row of `width`).
            let at = |c: usize| unsafe {
                let score = _mm512_loadu_ps(scores.as_ptr().add(16 * c));
                match offset {
                    Some(o) => _mm512_add_ps(score, _mm512_loadu_ps(o.as_ptr().add(16 * c))),
                    None => score,
                }
            };
            // Lanes at or past `valid` are the masked scores: −∞, as the generic loop sets them.
            let kept = |c: usize| -> __mmask16 {
                let start = 16 * c;
                if valid >= start + 16 {
                    0xffff
                } else {
                    ((1u32 << (valid.saturating_sub(start))) - 1) as __mmask16
                }
            };
            let minus_infinity = _mm512_set1_ps(f32::NEG_INFINITY);
            let score = |c: usize| _mm512_mask_mov_ps(minus_infinity, kept(c), at(c));
            let mut peak = minus_infinity;
            for c in 0..vectors {
                peak = _mm512_max_ps(peak, score(c));
            }
            let peak = super::nonpositive_shift(fold(peak, |a, b| _mm512_max_ps(a, b)));
            let shift = _mm512_set1_ps(peak);
            let mut total = _mm512_setzero_ps();
            let out = probabilities.as_mut_ptr();
            for c in 0..vectors {
                let value = exp_nonpositive(_mm512_sub_ps(score(c), shift));
                total = _mm512_add_ps(total, value);
                // SAFETY: vector `c` of the row.
                unsafe { _mm512_storeu_ps(out.add(16 * c), value) };
            }
            let total = fold(total, |a, b| _mm512_add_ps(a, b));
            let inverse = _mm512_set1_ps(1.0 / total);
            for c in 0..vectors {
                // SAFETY: vector `c` of the row; exact zeros past `valid`, whatever `inverse` is.
                unsafe {
                    let p = _mm512_mul_ps(_mm512_loadu_ps(out.add(16 * c)), inverse);
                    _mm512_storeu_ps(out.add(16 * c), _mm512_maskz_mov_ps(kept(c), p));
                }
            }
            probabilities[16 * vectors..].fill(0.0);
            *lse = peak + total.ln();
        }
    }

    /// The 16 lanes folded in halves by `combine`, as `fold_lanes` folds an array of them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn fold(v: __m512, combine: impl Fn(__m512, __m512) -> __m512) -> f32 {
        let upper = |v: __m512, lanes: i32| -> __m512 {
            // Lane `i` of the result is lane `i + lanes` of `v` (the upper lanes are not read).
            let indices = _mm512_add_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(lanes),
            );
            _mm512_permutexvar_ps(_mm512_and_si512(indices, _mm512_set1_epi32(15)), v)
        };
        let mut v = v;
        for lanes in [8, 4, 2, 1] {
            v = combine(v, upper(v, lanes));
        }
        _mm_cvtss_f32(_mm512_castps512_ps128(v))
    }

    /// `nn_rows::exp_f32_nonpositive::<true>` on 16 lanes, operation for operation.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    fn exp_nonpositive(x: __m512) -> __m512 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HIGH: f32 = 0.693_359_4;
        const LN2_LOW: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0;
        let splat = _mm512_set1_ps;
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, splat(-87.33));
        let x = _mm512_mask_mov_ps(x, under, splat(-87.33));
        let shifted = _mm512_fmadd_ps(x, splat(LOG2E), splat(ROUND));
        let n = _mm512_sub_ps(shifted, splat(ROUND));
        let r = _mm512_fmadd_ps(n, splat(-LN2_HIGH), x);
        let r = _mm512_fmadd_ps(n, splat(-LN2_LOW), r);
        let mut p = splat(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, splat(c));
        }
        let poly = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, splat(1.0)));
        let exponent = _mm512_sub_epi32(
            _mm512_castps_si512(shifted),
            _mm512_set1_epi32(ROUND.to_bits() as i32),
        );
        let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(exponent, _mm512_set1_epi32(127)));
        let value = _mm512_mul_ps(poly, _mm512_castsi512_ps(scale));
        _mm512_maskz_mov_ps(!under, value)
    }
}

/// The attention's f32 products straight on the `gemm-f32` crate's AVX-512 microkernels, with
/// no packing and no call into `gemm`'s loops: every product here is small (the score block
/// `32 × T × D`, the value and gradient products `T × D × 32`), its right operand has rows of
/// unit stride that the microkernel loads in place, and its left operand is read by broadcasts
/// through its strides. Through `gemm` each of these calls packed an operand and set up its
/// blocking.
mod tiles {
    use super::{Causal, View};

    /// Columns of `y` per microkernel call (4 vectors of 16).
    const PANEL: usize = 64;
    /// Rows of `y` per microkernel call.
    pub(super) const STRIP: usize = 6;

    /// True when this CPU runs the AVX-512 microkernels, checked once.
    fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `out (+)= beta · lhs · rhs` as [`super::product`], when `rhs` has unit column stride and
    /// `n` whole vectors of 16 (the microkernel loads whole vectors from `rhs`'s rows); false,
    /// having done nothing, otherwise.
    ///
    /// # Safety
    /// As [`super::product`].
    pub(super) unsafe fn product(
        (out, out_row): (*mut f32, usize),
        (m, n, k): (usize, usize, usize),
        lhs: View<f32>,
        rhs: View<f32>,
        beta: f32,
        accumulate: bool,
        causal: Causal,
    ) -> bool {
        if rhs.column != 1 || n % 16 != 0 || !available() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use gemm_f32::microkernel::avx512f::f32::UKR;
            // The microkernel computes a block of `yᵀ` (column major): its "lhs" is `rhs`
            // (`PANEL` columns loaded from each row), its "rhs" `lhs` (`STRIP` rows broadcast
            // at each depth step). Status 1 adds to `out`, 0 overwrites it.
            let status = u8::from(accumulate);
            for row in (0..m).step_by(STRIP) {
                let height = STRIP.min(m - row);
                // The strip's columns and depth range (`n`, and `skip..depth`).
                let (n, skip, depth) = match causal {
                    Causal::Full => (n, 0, k),
                    Causal::Columns(first) => {
                        (n.min((first + row + height).next_multiple_of(16)), 0, k)
                    }
                    Causal::Depth(first) => (n, 0, k.min(first + row + height)),
                    Causal::DepthFrom(first) => (n, row.saturating_sub(first).min(k - 1), k),
                };
                let k = depth - skip;
                let strip = lhs.pointer.wrapping_add(row * lhs.row + skip * lhs.column);
                let rhs_strip = rhs.pointer.wrapping_add(skip * rhs.row);
                for start in (0..n).step_by(PANEL) {
                    let width = PANEL.min(n - start);
                    let kernel = UKR[width / 16 - 1][height - 1];
                    // SAFETY: the kernel reads `k` rows of `width` floats of `rhs` from column
                    // `start` and `k` depth steps of `height` rows of `lhs` from row `row`
                    // (inside the operands, the caller's contract), and writes `height` rows of
                    // `width` floats of `out` at (`row`, `start`), inside `out`; AVX-512F is
                    // present (`available`).
                    unsafe {
                        kernel(
                            width,
                            height,
                            k,
                            out.add(row * out_row + start),
                            rhs_strip.add(start),
                            strip,
                            out_row as isize,
                            1,
                            rhs.row as isize,
                            lhs.column as isize,
                            lhs.row as isize,
                            1.0,
                            beta,
                            status,
                            false,
                            false,
                            false,
                            std::ptr::null(),
                        )
                    };
                }
            }
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            // `available` is false off x86_64: `gemm` serves every product there.
            let _ = (out, out_row, m, k, lhs, beta, accumulate);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let next = move |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 24.0 - 12.0
        };
        (0..len).map(next).collect()
    }

    #[test]
    fn the_vector_softmax_block_is_the_generic_one_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut compared = 0;
        // Blocks of the GPT reference heads (rows of 32 against 32 to 128 keys), a block whose
        // last rows are masked to a few keys, and rows with −∞ and far-out scores; without and
        // with a bias row added to every row.
        let cases = [(0, 32, 32), (32, 32, 64), (96, 32, 128), (0, 5, 48)];
        for ((first_row, rows, width), biased) in
            cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let mut input = scores(rows * width, (first_row * 131 + width) as u64);
            input[3] = f32::NEG_INFINITY;
            input[width + 1] = 80.0;
            input[rows * width - 1] = -300.0;
            let row = scores(width, 7);
            let offset = biased.then_some(row.as_slice());
            let (mut fast, mut generic) = (vec![7.0; rows * width], vec![7.0; rows * width]);
            let (mut fast_lse, mut generic_lse) = (vec![0.0; rows], vec![0.0; rows]);
            let done =
                rows::softmax_block(&input, offset, &mut fast, &mut fast_lse, first_row, width);
            if !done {
                eprintln!("no AVX-512 here: the generic loop is the only one");
                return;
            }
            let mut copy = input.clone();
            softmax_block(&mut copy, offset, &mut generic, &mut generic_lse, first_row, width);
            let case = format!("rows {first_row}.. of {width}, bias {biased}");
            assert_eq!(bits(&fast), bits(&generic), "probabilities, {case}");
            assert_eq!(bits(&fast_lse), bits(&generic_lse), "log-sum-exp, {case}");
            let first: f32 = fast[..width].iter().sum();
            assert!((first - 1.0).abs() < 1e-5, "{case}: row 0 sums to {first}");
            compared += 1;
        }
        assert_eq!(compared, 8);
        // Rows that are not whole vectors take the generic loop.
        let (mut p, mut lse) = (vec![0.0; 40], vec![0.0; 2]);
        assert!(!rows::softmax_block(&scores(40, 1), None, &mut p, &mut lse, 0, 20));
    }
}
