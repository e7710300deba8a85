//! Copies that move elements between layouts: permutations, slices along an axis, padding and
//! concatenation. Work on any dtype (the output keeps the input's dtype, bool included).

use crate::cpu::for_chunks;
use crate::{Context, Element, Result, Shape, Tensor};

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
