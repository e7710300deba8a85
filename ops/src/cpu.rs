//! Small CPU building blocks shared by the kernels: dtype dispatch, the compute type of each float
//! dtype (bf16/f16 compute in f32), chunked parallel loops over a [`Context`]'s thread budget,
//! element-wise maps, broadcasting and reductions.
//!
//! f32 and f64 kernels compute on the slices directly; bf16 and f16 kernels walk them in blocks
//! of [`BLOCK`] elements, converted to f32 (vectorised), computed and stored back. Inner loops
//! have no dtype dispatch and run [`vectorized`] (AVX2 + FMA where the CPU has them).

pub mod broadcast;
pub mod convert;
pub mod layout;
pub mod reduce;
pub mod simd;

use num_traits::{Float, FloatConst};
use rayon::prelude::*;

use crate::{Context, Element, Result, Tensor};

pub use broadcast::{binary, broadcast_copy, BroadcastPlan};
pub use reduce::{reduce_axes, Reduction};
pub use simd::vectorized;

/// Elements per block in the element-wise inner loops.
pub const BLOCK: usize = 512;

/// The smallest number of elements one parallel task works on.
pub const PARALLEL_CHUNK: usize = 32 * 1024;

/// Runs `$body` with `$T` bound to the Rust type of a float `$dtype`, or returns a dtype error
/// naming `$op`.
#[macro_export]
macro_rules! dispatch_float {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => Err($crate::Error::dtype($op, &[other], "needs a float dtype")),
        }
    };
}

/// Runs `$body` with `$T` bound to the storage type of any `$dtype` (`bool` is stored as `u8`).
#[macro_export]
macro_rules! dispatch_any {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DType::U8 | $crate::DType::Bool => {
                type $T = u8;
                $body
            }
        }
    };
}

/// What element-wise kernels compute in (f32 or f64): float arithmetic plus the special functions
/// that `num_traits::Float` lacks.
pub trait Special:
    Float + FloatConst + Send + Sync + Copy + Default + std::fmt::Debug + 'static
{
    /// The error function.
    fn erf(self) -> Self;
    /// `value` rounded to this type (for constants in kernels).
    fn constant(value: f64) -> Self;
}

impl Special for f32 {
    fn erf(self) -> f32 {
        libm::erff(self)
    }
    fn constant(value: f64) -> f32 {
        value as f32
    }
}

impl Special for f64 {
    fn erf(self) -> f64 {
        libm::erf(self)
    }
    fn constant(value: f64) -> f64 {
        value
    }
}

/// A float element type that kernels can compute with: f32 and f64 compute in themselves,
/// bf16 and f16 in f32.
pub trait FloatElement: Element + Float {
    /// The type arithmetic is done in.
    type Acc: Special;

    /// Widens one element.
    fn to_acc(self) -> Self::Acc;

    /// Narrows one element (round to nearest).
    fn from_acc(value: Self::Acc) -> Self;

    /// Widens a block: `dst[i] = src[i]`.
    fn load(src: &[Self], dst: &mut [Self::Acc]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }

    /// Narrows a block: `dst[i] = src[i]`.
    fn store(src: &[Self::Acc], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(s);
        }
    }

    /// `value` (an attribute such as a scalar operand) in the compute type.
    fn acc_from_f64(value: f64) -> Self::Acc;

    /// `dst[i] = f(src[i])` in the compute type: in place for f32/f64, through widened blocks
    /// of [`BLOCK`] elements for bf16/f16.
    #[inline(always)]
    fn map(src: &[Self], dst: &mut [Self], f: impl Fn(Self::Acc) -> Self::Acc) {
        let mut buffer = [Self::Acc::default(); BLOCK];
        for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
            let buffer = &mut buffer[..s.len()];
            Self::load(s, buffer);
            buffer.iter_mut().for_each(|v| *v = f(*v));
            Self::store(buffer, d);
        }
    }

    /// `dst[i] = f(a[i], b[i])` in the compute type, as [`FloatElement::map`].
    #[inline(always)]
    fn map2(
        a: &[Self],
        b: &[Self],
        dst: &mut [Self],
        f: impl Fn(Self::Acc, Self::Acc) -> Self::Acc,
    ) {
        let mut left = [Self::Acc::default(); BLOCK];
        let mut right = [Self::Acc::default(); BLOCK];
        for ((a, b), d) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(dst.chunks_mut(BLOCK)) {
            let n = a.len();
            Self::load(a, &mut left[..n]);
            Self::load(b, &mut right[..n]);
            left[..n].iter_mut().zip(&right[..n]).for_each(|(l, &r)| *l = f(*l, r));
            Self::store(&left[..n], d);
        }
    }
}

macro_rules! float_self {
    ($($t:ty),*) => {$(
        impl FloatElement for $t {
            type Acc = $t;
            #[inline(always)]
            fn to_acc(self) -> $t {
                self
            }
            #[inline(always)]
            fn from_acc(value: $t) -> $t {
                value
            }
            fn load(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src);
            }
            fn store(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src);
            }
            fn acc_from_f64(value: f64) -> $t {
                value as $t
            }
            #[inline(always)]
            fn map(src: &[$t], dst: &mut [$t], f: impl Fn($t) -> $t) {
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f(s));
            }
            #[inline(always)]
            fn map2(a: &[$t], b: &[$t], dst: &mut [$t], f: impl Fn($t, $t) -> $t) {
                dst.iter_mut().zip(a.iter().zip(b)).for_each(|(d, (&a, &b))| *d = f(a, b));
            }
        }
    )*};
}

float_self!(f32, f64);

macro_rules! float_half {
    ($($t:ty),*) => {$(
        impl FloatElement for $t {
            type Acc = f32;
            #[inline(always)]
            fn to_acc(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_acc(value: f32) -> $t {
                <$t>::from_f32(value)
            }
            fn load(src: &[$t], dst: &mut [f32]) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
            }
            fn store(src: &[f32], dst: &mut [$t]) {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
            }
            fn acc_from_f64(value: f64) -> f32 {
                value as f32
            }
        }
    )*};
}

float_half!(half::bf16, half::f16);

/// Runs `f(start, chunk)` over `out` split into chunks, in parallel on the context's pool when it
/// has more than one thread and `out` is long enough; `start` is the chunk's offset in `out`.
/// `grain` is the number of elements of work per item of `out` (rows count their length).
/// Each chunk runs [`vectorized`].
pub fn for_chunks<T: Send>(
    ctx: &Context,
    out: &mut [T],
    grain: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let items = out.len();
    let work = items.saturating_mul(grain.max(1));
    if ctx.threads() <= 1 || work < 2 * PARALLEL_CHUNK || items < 2 {
        vectorized(|| f(0, out));
        return;
    }
    let min_items = PARALLEL_CHUNK.div_ceil(grain.max(1)).max(1);
    let chunk = items.div_ceil(ctx.threads() * 4).max(min_items);
    ctx.install(|| {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, part)| vectorized(|| f(i * chunk, part)));
    });
}

/// `y[i] = f(x[i])` into a new tensor of the same shape and dtype (single-threaded, any element).
pub fn map<T: Element>(x: &Tensor, f: impl Fn(T) -> T) -> Result<Tensor> {
    let data: Vec<T> = x.as_slice::<T>()?.iter().map(|&v| f(v)).collect();
    Tensor::from_vec(data, x.shape().clone())
}

/// `y[i] = f(x[i])` computed in `T::Acc`, blocked and parallel over the context.
pub fn unary<T: FloatElement>(
    ctx: &Context,
    x: &Tensor,
    f: impl Fn(T::Acc) -> T::Acc + Sync + Send,
) -> Result<Tensor> {
    let src = x.as_slice::<T>()?;
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), T::DTYPE);
    for_chunks(ctx, out.as_mut_slice::<T>()?, 1, |start, chunk| {
        T::map(&src[start..start + chunk.len()], chunk, &f);
    });
    Ok(out)
}

/// `z[i] = f(x[i], y[i])` over two tensors of the same shape, computed in `T::Acc`.
pub fn zip<T: FloatElement>(
    ctx: &Context,
    x: &Tensor,
    y: &Tensor,
    f: impl Fn(T::Acc, T::Acc) -> T::Acc + Sync + Send,
) -> Result<Tensor> {
    let (a, b) = (x.as_slice::<T>()?, y.as_slice::<T>()?);
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), T::DTYPE);
    for_chunks(ctx, out.as_mut_slice::<T>()?, 1, |start, chunk| {
        let end = start + chunk.len();
        T::map2(&a[start..end], &b[start..end], chunk, &f);
    });
    Ok(out)
}
