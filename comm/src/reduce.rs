//! Element-wise reductions over raw bytes of a runtime dtype, and balanced chunking.

use std::ops::Range;

use half::{bf16, f16};
use meshflow_ops::DType;

use crate::{Error, Result};

/// How contributions are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum (wrapping for integers).
    Sum,
    /// Element-wise maximum.
    Max,
}

impl ReduceOp {
    /// The name used in errors.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
        }
    }
}

/// Fails unless `operation` is defined for `dtype` (f32, f64, bf16, f16, i64, i32).
pub fn check_reducible(collective: &'static str, dtype: DType, operation: ReduceOp) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 | DType::I64 | DType::I32 => Ok(()),
        DType::U8 | DType::Bool => {
            Err(Error::UnsupportedDType { collective, operation: operation.name(), dtype })
        }
    }
}

/// `accumulator[i] = accumulator[i] ⊕ other[i]` over `dtype` elements stored as bytes.
pub fn reduce_into(
    collective: &'static str,
    accumulator: &mut [u8],
    other: &[u8],
    dtype: DType,
    operation: ReduceOp,
) -> Result<()> {
    if accumulator.len() != other.len() {
        return Err(Error::InvalidArgument {
            collective,
            reason: format!("reducing {} bytes into {} bytes", other.len(), accumulator.len()),
        });
    }
    match dtype {
        DType::F32 => {
            combine::<f32>(collective, accumulator, other, operation, |a, b| a + b, f32::max)
        }
        DType::F64 => {
            combine::<f64>(collective, accumulator, other, operation, |a, b| a + b, f64::max)
        }
        DType::BF16 => {
            combine::<bf16>(collective, accumulator, other, operation, |a, b| a + b, bf16::max)
        }
        DType::F16 => {
            combine::<f16>(collective, accumulator, other, operation, |a, b| a + b, f16::max)
        }
        DType::I64 => {
            combine::<i64>(collective, accumulator, other, operation, i64::wrapping_add, i64::max)
        }
        DType::I32 => {
            combine::<i32>(collective, accumulator, other, operation, i32::wrapping_add, i32::max)
        }
        DType::U8 | DType::Bool => check_reducible(collective, dtype, operation),
    }
}

/// Bytes combined at a time by [`reduce_pair`]: the block of the target stays in the L1 cache
/// between its copy and its reduction.
const PAIR_BLOCK_BYTES: usize = 16 << 10;

/// `target[i] = first[i] ⊕ second[i]`, block by block: memory sees one read of each source and
/// one write of the target.
pub fn reduce_pair(
    collective: &'static str,
    target: &mut [u8],
    first: &[u8],
    second: &[u8],
    dtype: DType,
    operation: ReduceOp,
) -> Result<()> {
    check_pair(collective, target, first, second)?;
    let blocks = target.chunks_mut(PAIR_BLOCK_BYTES);
    for ((block, first), second) in
        blocks.zip(first.chunks(PAIR_BLOCK_BYTES)).zip(second.chunks(PAIR_BLOCK_BYTES))
    {
        block.copy_from_slice(first);
        reduce_into(collective, block, second, dtype, operation)?;
    }
    Ok(())
}

/// Two sources of a pairwise reduction are as long as its target.
fn check_pair(collective: &'static str, target: &[u8], a: &[u8], b: &[u8]) -> Result<()> {
    if target.len() == a.len() && target.len() == b.len() {
        return Ok(());
    }
    let reason = format!("reducing {} and {} bytes into {} bytes", a.len(), b.len(), target.len());
    Err(Error::InvalidArgument { collective, reason })
}

/// `target[i] = received[i] ⊕ mine[i]`, where `received` may start at any byte (a slice of a
/// network packet): one pass over the three, no copy of `received` into place first.
pub fn reduce_received(
    collective: &'static str,
    target: &mut [u8],
    received: &[u8],
    mine: &[u8],
    dtype: DType,
    operation: ReduceOp,
) -> Result<()> {
    check_pair(collective, target, received, mine)?;
    let sources = (received, mine);
    match dtype {
        DType::F32 => {
            combine_received::<f32>(collective, target, sources, operation, |a, b| a + b, f32::max)
        }
        DType::F64 => {
            combine_received::<f64>(collective, target, sources, operation, |a, b| a + b, f64::max)
        }
        DType::BF16 => combine_received::<bf16>(
            collective,
            target,
            sources,
            operation,
            |a, b| a + b,
            bf16::max,
        ),
        DType::F16 => {
            combine_received::<f16>(collective, target, sources, operation, |a, b| a + b, f16::max)
        }
        DType::I64 => combine_received::<i64>(
            collective,
            target,
            sources,
            operation,
            i64::wrapping_add,
            i64::max,
        ),
        DType::I32 => combine_received::<i32>(
            collective,
            target,
            sources,
            operation,
            i32::wrapping_add,
            i32::max,
        ),
        DType::U8 | DType::Bool => check_reducible(collective, dtype, operation),
    }
}

/// A buffer whose bytes cannot be viewed as its dtype's elements.
fn misaligned(collective: &'static str) -> Error {
    Error::InvalidArgument { collective, reason: "buffer is not aligned to its dtype".into() }
}

fn combine_received<T: bytemuck::Pod>(
    collective: &'static str,
    target: &mut [u8],
    (received, mine): (&[u8], &[u8]),
    operation: ReduceOp,
    sum: impl Fn(T, T) -> T,
    max: impl Fn(T, T) -> T,
) -> Result<()> {
    let misaligned = |_| misaligned(collective);
    let target: &mut [T] = bytemuck::try_cast_slice_mut(target).map_err(misaligned)?;
    let mine: &[T] = bytemuck::try_cast_slice(mine).map_err(misaligned)?;
    let received =
        received.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned::<T>);
    let pairs = target.iter_mut().zip(received.zip(mine));
    match operation {
        ReduceOp::Sum => pairs.for_each(|(t, (r, &m))| *t = sum(r, m)),
        ReduceOp::Max => pairs.for_each(|(t, (r, &m))| *t = max(r, m)),
    }
    Ok(())
}

fn combine<T: bytemuck::Pod>(
    collective: &'static str,
    accumulator: &mut [u8],
    other: &[u8],
    operation: ReduceOp,
    sum: impl Fn(T, T) -> T,
    max: impl Fn(T, T) -> T,
) -> Result<()> {
    let misaligned = |_| misaligned(collective);
    let accumulator: &mut [T] = bytemuck::try_cast_slice_mut(accumulator).map_err(misaligned)?;
    let other: &[T] = bytemuck::try_cast_slice(other).map_err(misaligned)?;
    match operation {
        ReduceOp::Sum => apply(accumulator, other, sum),
        ReduceOp::Max => apply(accumulator, other, max),
    }
    Ok(())
}

/// `target[i] = combine(target[i], other[i])`, run as a copy compiled for AVX2 where the CPU
/// has it (the baseline x86-64 build combines 4 floats at a time with SSE; AVX2 does 8).
#[inline(always)]
fn apply<T: Copy>(target: &mut [T], other: &[T], combine: impl Fn(T, T) -> T) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { apply_avx2(target, other, combine) };
    }
    apply_baseline(target, other, combine)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn apply_avx2<T: Copy>(target: &mut [T], other: &[T], combine: impl Fn(T, T) -> T) {
    apply_baseline(target, other, combine)
}

#[inline(always)]
fn apply_baseline<T: Copy>(target: &mut [T], other: &[T], combine: impl Fn(T, T) -> T) {
    target.iter_mut().zip(other).for_each(|(a, &b)| *a = combine(*a, b))
}

/// The `index`-th of `parts` balanced pieces of `0..count`: the first `count % parts` pieces hold
/// one element more than the rest.
pub fn chunk(count: usize, parts: usize, index: usize) -> Range<usize> {
    let parts = parts.max(1);
    let base = count / parts;
    let extra = count % parts;
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_balanced_and_cover_everything() {
        let ranges: Vec<_> = (0..4).map(|index| chunk(10, 4, index)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(chunk(2, 5, 4), 2..2);
    }

    #[test]
    fn reductions_per_dtype() {
        let mut a = bytemuck::cast_slice(&[1.5f32, -2.0]).to_vec();
        reduce_into(
            "test",
            &mut a,
            bytemuck::cast_slice(&[2.0f32, -3.0]),
            DType::F32,
            ReduceOp::Sum,
        )
        .expect("sum");
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&a), &[3.5, -5.0]);
        let mut b = bytemuck::cast_slice(&[bf16::from_f32(1.0), bf16::from_f32(4.0)]).to_vec();
        let other = [bf16::from_f32(3.0), bf16::from_f32(-1.0)];
        reduce_into("test", &mut b, bytemuck::cast_slice(&other), DType::BF16, ReduceOp::Max)
            .expect("max");
        assert_eq!(
            bytemuck::cast_slice::<u8, bf16>(&b),
            &[bf16::from_f32(3.0), bf16::from_f32(4.0)]
        );
        let mut pair = vec![0u8; 8];
        let (first, second) = ([1.0f32, 2.0], [0.5f32, -4.0]);
        let sources = (bytemuck::cast_slice(&first), bytemuck::cast_slice(&second));
        reduce_pair("test", &mut pair, sources.0, sources.1, DType::F32, ReduceOp::Sum)
            .expect("pair");
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&pair), &[1.5, -2.0]);
        // A received slice that starts at an odd byte.
        let mut packet = vec![0u8];
        packet.extend_from_slice(bytemuck::cast_slice(&[2.0f64, -1.0]));
        let mut target = vec![0u8; 16];
        let mine = bytemuck::cast_slice(&[0.5f64, 3.0]);
        reduce_received("test", &mut target, &packet[1..], mine, DType::F64, ReduceOp::Max)
            .expect("received");
        assert_eq!(bytemuck::cast_slice::<u8, f64>(&target), &[2.0, 3.0]);
        let error = reduce_into("all_reduce", &mut [1u8], &[1u8], DType::Bool, ReduceOp::Sum);
        assert!(matches!(error, Err(Error::UnsupportedDType { collective: "all_reduce", .. })));
    }
}
