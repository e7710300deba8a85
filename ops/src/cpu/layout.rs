//! Copies that move elements between layouts: permutations, slices along an axis, padding and
//! concatenation. Work on any dtype (the output keeps the input's dtype, bool included).

use crate::cpu::for_chunks;
use crate::{Context, Element, Result, Shape, Tensor};

/// `out[j·rows + i] = source[i·stride + j]` for `i < rows`, `j < columns`: a `rows × columns`
/// matrix whose rows lie `stride` apart, written transposed and dense (`columns × rows`, row
/// major). The fused attention hands its products its keys and values this way, which `gemm`
/// otherwise gathered element by element for every row block. (Tried and dropped for a matmul's
/// transposed right operand, the `Wᵀ` of `x·Wᵀ`, which `gemm` packs once per call: MLP and GPT
/// steps unchanged or 1-3 % slower, A/B in one run.)
///
/// 4-byte elements on an AVX-512 CPU go in tiles of 16 × 16 transposed in registers
/// ([`transpose_tiles_x86_v4`]); the rest, and other element sizes, sixteen source rows at a
/// time, so that each store writes sixteen neighbours instead of one element of a column.
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
    #[cfg(target_arch = "x86_64")]
    if size_of::<T>() == 4 && align_of::<T>() == 4 && crate::cpu::simd::has_x86_v4() {
        // SAFETY: the CPU has AVX-512 (checked); 4-byte elements aligned as `f32` move as `f32`
        // bit patterns (loads, shuffles and stores copy bits); the extent is the caller's
        // contract.
        let done = unsafe {
            transpose_tiles_x86_v4(source.cast(), stride, (rows, columns), out.as_mut_ptr().cast())
        };
        // The columns past the last whole tile, on every row.
        // SAFETY: as above, from column `done` on.
        unsafe { transpose_blocks(source, stride, (rows, columns), done, out) };
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe { transpose_blocks(source, stride, (rows, columns), 0, out) };
}

/// [`transpose_rows`] of columns `first_column..columns` only, sixteen source rows at a time.
///
/// # Safety
/// As [`transpose_rows`].
unsafe fn transpose_blocks<T: Copy>(
    source: *const T,
    stride: usize,
    (rows, columns): (usize, usize),
    first_column: usize,
    out: &mut [T],
) {
    // SAFETY: row `i < rows` holds `columns` elements (the caller's contract).
    let row = |i: usize| unsafe { std::slice::from_raw_parts(source.add(i * stride), columns) };
    const ROWS: usize = 16;
    let whole = rows - rows % ROWS;
    for start in (0..whole).step_by(ROWS) {
        let block: [&[T]; ROWS] = std::array::from_fn(|i| row(start + i));
        for j in first_column..columns {
            let column = &mut out[j * rows + start..][..ROWS];
            for (value, source) in column.iter_mut().zip(&block) {
                *value = source[j];
            }
        }
    }
    for i in whole..rows {
        for (j, &value) in row(i).iter().enumerate().skip(first_column) {
            out[j * rows + i] = value;
        }
    }
}

/// The whole 16 × 16 tiles of [`transpose_rows`] for 4-byte elements: sixteen rows of sixteen
/// loaded into registers, interleaved in pairs of elements, of pairs and of 128-bit lanes (64
/// shuffles for 256 elements, against a gathered element per store), and stored as sixteen
/// output rows. Rows past the last whole tile are copied element by element here; columns past
/// it are left to the caller, whose first column is the one returned. The key transposes of
/// the GPT reference heads (`128 × 64`, rows 768 apart) took 2.6 µs each element by element,
/// 12.8 % of the fused attention's forward (`perf`).
///
/// # Safety
/// The CPU must have AVX-512F; `source` must reach `(rows − 1)·stride + columns` elements and
/// `out` hold `rows · columns`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tiles_x86_v4(
    source: *const f32,
    stride: usize,
    (rows, columns): (usize, usize),
    out: *mut f32,
) -> usize {
    use std::arch::x86_64::*;
    const N: usize = 16;
    let tiles = columns / N * N;
    let whole_rows = rows / N * N;
    for i0 in (0..whole_rows).step_by(N) {
        for j0 in (0..tiles).step_by(N) {
            // SAFETY: rows `i0..i0 + 16` and columns `j0..j0 + 16` lie inside the source, and
            // output rows `j0..j0 + 16`, columns `i0..i0 + 16` inside `out` (the contract).
            unsafe {
                let r: [__m512; N] =
                    std::array::from_fn(|i| _mm512_loadu_ps(source.add((i0 + i) * stride + j0)));
                // Pairs: within each 128-bit lane `x0 y0 x1 y1` and `x2 y2 x3 y3`.
                let mut a = [_mm512_setzero_ps(); N];
                for i in 0..N / 2 {
                    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // Quads: `b[4q + c]` holds, in lane `l`, column `4l + c` of rows `4q..4q + 4`.
                let mut b = [_mm512_setzero_ps(); N];
                let pd = _mm512_castps_pd;
                for q in 0..N / 4 {
                    let (lo, hi) = (a[4 * q], a[4 * q + 1]);
                    let (lo2, hi2) = (a[4 * q + 2], a[4 * q + 3]);
                    b[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(lo), pd(lo2)));
                    b[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(lo), pd(lo2)));
                    b[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(hi), pd(hi2)));
                    b[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(hi), pd(hi2)));
                }
                // Lanes: output row `4l + c` is lane `l` of `b[c]`, `b[4 + c]`, `b[8 + c]`,
                // `b[12 + c]`.
                for c in 0..4 {
                    let u0 = _mm512_shuffle_f32x4::<0x44>(b[c], b[4 + c]);
                    let u1 = _mm512_shuffle_f32x4::<0xEE>(b[c], b[4 + c]);
                    let u2 = _mm512_shuffle_f32x4::<0x44>(b[8 + c], b[12 + c]);
                    let u3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + c], b[12 + c]);
                    let lanes = [
                        _mm512_shuffle_f32x4::<0x88>(u0, u2),
                        _mm512_shuffle_f32x4::<0xDD>(u0, u2),
                        _mm512_shuffle_f32x4::<0x88>(u1, u3),
                        _mm512_shuffle_f32x4::<0xDD>(u1, u3),
                    ];
                    for (l, lane) in lanes.into_iter().enumerate() {
                        _mm512_storeu_ps(out.add((j0 + 4 * l + c) * rows + i0), lane);
                    }
                }
            }
        }
    }
    for i in whole_rows..rows {
        for j in 0..tiles {
            // SAFETY: inside both buffers (the contract).
            unsafe { *out.add(j * rows + i) = *source.add(i * stride + j) };
        }
    }
    tiles
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
        // Rows and columns in whole tiles of 16 and tails (the register tiles, the rows past
        // them and the columns past them), 4-byte elements (the AVX-512 path where the CPU has
        // it) and 8-byte ones (element by element).
        for (rows, columns, stride) in [(35, 5, 7), (32, 16, 16), (37, 41, 50), (128, 64, 768)] {
            let source: Vec<u32> = (0..rows * stride).map(|v| v as u32).collect();
            let mut out = vec![u32::MAX; rows * columns];
            // SAFETY: the source holds `rows · stride ≥ (rows − 1)·stride + columns` elements.
            unsafe { transpose_rows(source.as_ptr(), stride, (rows, columns), &mut out) };
            let wide: Vec<u64> = source.iter().map(|&v| u64::from(v) << 20).collect();
            let mut wide_out = vec![u64::MAX; rows * columns];
            // SAFETY: as above.
            unsafe { transpose_rows(wide.as_ptr(), stride, (rows, columns), &mut wide_out) };
            for i in 0..rows {
                for j in 0..columns {
                    let want = (i * stride + j) as u32;
                    assert_eq!(out[j * rows + i], want, "{rows}x{columns}: row {i}, column {j}");
                    assert_eq!(wide_out[j * rows + i], u64::from(want) << 20, "8-byte {i}, {j}");
                }
            }
        }
    }
}
