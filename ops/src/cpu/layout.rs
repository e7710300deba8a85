//! Copies that move elements between layouts: permutations, slices along an axis, padding and
//! concatenation. Work on any dtype (the output keeps the input's dtype, bool included).

use crate::cpu::for_chunks;
use crate::{Context, Element, Result, Shape, Tensor};

/// `out[j·rows + i] = source[i·stride + j]` for `i < rows`, `j < columns`: a `rows × columns`
/// matrix whose rows lie `stride` apart, written transposed and dense (`columns × rows`, row
/// major). Sixteen source rows at a time, so that each store writes sixteen neighbours (one
/// vector) instead of one element of a column. The fused attention hands `gemm` its keys and
/// values this way, which it otherwise gathered element by element for every row block. (Tried
/// and dropped for a matmul's transposed right operand, the `Wᵀ` of `x·Wᵀ`, which `gemm` packs
/// once per call: MLP and GPT steps unchanged or 1-3 % slower, A/B in one run.)
///
/// # Safety
/// `source` must reach `(rows − 1)·stride + columns` elements; `out` holds `rows · columns`.
pub(crate) unsafe fn transpose_rows<T: Copy>(
    source: *const T,
    stride: usize,
    (rows, columns): (usize, usize),
    out: &mut [T],
) {
    assert!(out.len() >= rows * columns, "transpose_rows: the output is too short");
    // SAFETY: row `i < rows` holds `columns` elements (the caller's contract).
    let row = |i: usize| unsafe { std::slice::from_raw_parts(source.add(i * stride), columns) };
    const ROWS: usize = 16;
    let whole = rows - rows % ROWS;
    for start in (0..whole).step_by(ROWS) {
        let block: [&[T]; ROWS] = std::array::from_fn(|i| row(start + i));
        for j in 0..columns {
            let column = &mut out[j * rows + start..][..ROWS];
            for (value, source) in column.iter_mut().zip(&block) {
                *value = source[j];
            }
        }
    }
    for i in whole..rows {
        for (j, &value) in row(i).iter().enumerate() {
            out[j * rows + i] = value;
        }
    }
}

/// `x` with its axes reordered: output axis `k` is input axis `perm[k]` (a valid permutation).
pub fn permute<T: Element>(ctx: &Context, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
    let strides = x.shape().strides();
    let from: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let mut out = Tensor::for_overwrite(ctx, Shape::new(dims.clone()), x.dtype());
    if out.numel() == 0 {
        return Ok(out);
    }
    let src = x.as_slice::<T>()?;
    let row = dims.last().copied().unwrap_or(1);
    let step = from.last().copied().unwrap_or(1);
    let outer = &dims[..dims.len().saturating_sub(1)];
    let mut rows: Vec<&mut [T]> = out.as_mut_slice::<T>()?.chunks_mut(row).collect();
    for_chunks(ctx, &mut rows, row, |first, chunk| {
        for (r, dst) in chunk.iter_mut().enumerate() {
            let mut rest = first + r;
            let mut offset = 0;
            for k in (0..outer.len()).rev() {
                offset += (rest % outer[k]) * from[k];
                rest /= outer[k];
            }
            if step == 1 {
                dst.copy_from_slice(&src[offset..offset + row]);
            } else {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = src[offset + j * step];
                }
            }
        }
    });
    Ok(out)
}

/// Elements `start..start + len` of `x` along `axis` (in range, checked by the caller).
pub fn narrow<T: Element>(
    ctx: &Context,
    x: &Tensor,
    axis: usize,
    start: usize,
    len: usize,
) -> Result<Tensor> {
    let (outer, size, inner) = x.shape().split_at_axis(axis);
    let mut out = Tensor::for_overwrite(ctx, x.shape().with_dim(axis, len), x.dtype());
    if out.numel() == 0 {
        return Ok(out);
    }
    let src = x.as_slice::<T>()?;
    let block = len * inner;
    for (o, dst) in out.as_mut_slice::<T>()?.chunks_mut(block).enumerate() {
        let from = (o * size + start) * inner;
        dst.copy_from_slice(&src[from..from + block]);
    }
    debug_assert_eq!(out.numel(), outer * block);
    Ok(out)
}

/// `x` placed at `start` along `axis` of a zero tensor whose `axis` has size `total`.
pub fn pad<T: Element>(x: &Tensor, axis: usize, start: usize, total: usize) -> Result<Tensor> {
    let (_, len, inner) = x.shape().split_at_axis(axis);
    let mut out = Tensor::zeros(x.shape().with_dim(axis, total), x.dtype());
    if x.numel() == 0 {
        return Ok(out);
    }
    let src = x.as_slice::<T>()?;
    let (block, full) = (len * inner, total * inner);
    let dst = out.as_mut_slice::<T>()?;
    for (o, piece) in src.chunks(block).enumerate() {
        let to = o * full + start * inner;
        dst[to..to + block].copy_from_slice(piece);
    }
    Ok(out)
}

/// The tensors joined along `axis` (same dtype and same dims elsewhere, checked by the caller).
pub fn concat<T: Element>(
    ctx: &Context,
    xs: &[&Tensor],
    axis: usize,
    shape: &Shape,
) -> Result<Tensor> {
    let dtype = xs.first().map_or(T::DTYPE, |x| x.dtype());
    let mut out = Tensor::for_overwrite(ctx, shape.clone(), dtype);
    let (outer, total, inner) = shape.split_at_axis(axis);
    if out.numel() == 0 {
        return Ok(out);
    }
    let dst = out.as_mut_slice::<T>()?;
    let mut offset = 0;
    for x in xs {
        let block = x.dims()[axis] * inner;
        let src = x.as_slice::<T>()?;
        for o in 0..outer {
            let to = o * total * inner + offset;
            dst[to..to + block].copy_from_slice(&src[o * block..(o + 1) * block]);
        }
        offset += block;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::transpose_rows;

    #[test]
    fn transpose_rows_writes_every_element_once_in_blocks_and_tail() {
        // 35 rows (two blocks of 16 and a tail of 3) of 5 columns, 7 apart.
        let (rows, columns, stride) = (35, 5, 7);
        let source: Vec<u32> = (0..rows * stride).map(|v| v as u32).collect();
        let mut out = vec![u32::MAX; rows * columns];
        // SAFETY: the source holds `rows · stride ≥ (rows − 1)·stride + columns` elements.
        unsafe { transpose_rows(source.as_ptr(), stride, (rows, columns), &mut out) };
        for i in 0..rows {
            for j in 0..columns {
                assert_eq!(out[j * rows + i], (i * stride + j) as u32, "row {i}, column {j}");
            }
        }
    }
}
