//! Small CPU building blocks shared by the kernels: dtype dispatch, the compute type of each float
//! dtype (bf16/f16 compute in f32), chunked parallel loops over a [`Context`]'s thread budget,
//! element-wise maps, broadcasting and reductions.
//!
//! f32 and f64 kernels compute on the slices directly; bf16 and f16 kernels walk them in blocks
//! of [`BLOCK`] elements, converted to f32 (vectorised), computed and stored back. Inner loops
//! have no dtype dispatch and run [`vectorized`] (AVX2 + FMA where the CPU has them).

pub mod broadcast;
pub mod convert;
pub mod in_place;
pub mod layout;
pub mod reduce;
pub mod simd;

use num_traits::{Float, FloatConst};
use rayon::prelude::*;

use crate::{Context, Element, Result, Tensor};

pub use broadcast::{binary, broadcast_copy, BroadcastPlan};
pub use in_place::{binary_owned, unary_owned, Flip};
pub use reduce::{reduce_axes, Reduction};
pub use simd::vectorized;

use simd::multiversion;

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

/// An element-wise function of one value in the compute type `A`.
///
/// The element loops of [`unary`], [`zip`] and [`binary`] call it by name inside a
/// `multiversion!` function, where an `#[inline(always)]` `call` is
/// inlined and vectorised (a large kernel handed down as a closure stayed a scalar call per
/// element: `perf annotate`). Closures implement it too, for small kernels.
pub trait Map1<A>: Sync {
    /// `f(x)`; `FUSED`: called from code where `mul_add` is one FMA instruction (the `FUSED`
    /// of `multiversion!`), for functions that evaluate polynomials.
    fn call<const FUSED: bool>(&self, x: A) -> A;
}

/// An element-wise function of two values in the compute type `A` (see [`Map1`]).
pub trait Map2<A>: Sync {
    /// `f(x, y)`; `FUSED` as in [`Map1::call`].
    fn call<const FUSED: bool>(&self, x: A, y: A) -> A;
}

impl<A, F: Fn(A) -> A + Sync> Map1<A> for F {
    #[inline(always)]
    fn call<const FUSED: bool>(&self, x: A) -> A {
        self(x)
    }
}

impl<A, F: Fn(A, A) -> A + Sync> Map2<A> for F {
    #[inline(always)]
    fn call<const FUSED: bool>(&self, x: A, y: A) -> A {
        self(x, y)
    }
}

/// `f(x, y)` with `x` fixed: a [`Map2`] as a [`Map1`] of its second argument.
pub struct FixLeft<'a, F, A>(pub &'a F, pub A);

impl<F: Map2<A>, A: Copy + Sync> Map1<A> for FixLeft<'_, F, A> {
    #[inline(always)]
    fn call<const FUSED: bool>(&self, y: A) -> A {
        self.0.call::<FUSED>(self.1, y)
    }
}

/// `f(x, y)` with `y` fixed: a [`Map2`] as a [`Map1`] of its first argument.
pub struct FixRight<'a, F, A>(pub &'a F, pub A);

impl<F: Map2<A>, A: Copy + Sync> Map1<A> for FixRight<'_, F, A> {
    #[inline(always)]
    fn call<const FUSED: bool>(&self, x: A) -> A {
        self.0.call::<FUSED>(x, self.1)
    }
}

multiversion! {
    /// `dst[i] = f(src[i])` computed in `T::Acc`: directly for f32/f64, through widened blocks
    /// of [`BLOCK`] elements for bf16/f16.
    pub fn map_slice<T: FloatElement, F: Map1<T::Acc>>(f: &F, src: &[T], dst: &mut [T]) {
        if T::NATIVE {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = T::from_acc(f.call::<FUSED>(s.to_acc()));
            }
            return;
        }
        let mut buffer = [T::Acc::default(); BLOCK];
        for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
            let buffer = &mut buffer[..s.len()];
            T::load(s, buffer);
            for v in buffer.iter_mut() {
                *v = f.call::<FUSED>(*v);
            }
            T::store(buffer, d);
        }
    }
}

multiversion! {
    /// `dst[i] = f(a[i], b[i])` computed in `T::Acc`, as [`map_slice`].
    pub fn map2_slice<T: FloatElement, F: Map2<T::Acc>>(f: &F, a: &[T], b: &[T], dst: &mut [T]) {
        if T::NATIVE {
            for (d, (&x, &y)) in dst.iter_mut().zip(a.iter().zip(b)) {
                *d = T::from_acc(f.call::<FUSED>(x.to_acc(), y.to_acc()));
            }
            return;
        }
        let mut left = [T::Acc::default(); BLOCK];
        let mut right = [T::Acc::default(); BLOCK];
        for ((a, b), d) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(dst.chunks_mut(BLOCK)) {
            let n = a.len();
            T::load(a, &mut left[..n]);
            T::load(b, &mut right[..n]);
            for (l, &r) in left[..n].iter_mut().zip(&right[..n]) {
                *l = f.call::<FUSED>(*l, r);
            }
            T::store(&left[..n], d);
        }
    }
}

multiversion! {
    /// `xs[i] = f(xs[i])` computed in `T::Acc`, as [`map_slice`].
    pub fn map_slice_in_place<T: FloatElement, F: Map1<T::Acc>>(f: &F, xs: &mut [T]) {
        if T::NATIVE {
            for x in xs.iter_mut() {
                *x = T::from_acc(f.call::<FUSED>(x.to_acc()));
            }
            return;
        }
        let mut buffer = [T::Acc::default(); BLOCK];
        for block in xs.chunks_mut(BLOCK) {
            let buffer = &mut buffer[..block.len()];
            T::load(block, buffer);
            for v in buffer.iter_mut() {
                *v = f.call::<FUSED>(*v);
            }
            T::store(buffer, block);
        }
    }
}

multiversion! {
    /// `xs[i] = f(xs[i], ys[i])` computed in `T::Acc`, as [`map2_slice`].
    pub fn map2_slice_in_place<T: FloatElement, F: Map2<T::Acc>>(f: &F, xs: &mut [T], ys: &[T]) {
        if T::NATIVE {
            for (x, &y) in xs.iter_mut().zip(ys) {
                *x = T::from_acc(f.call::<FUSED>(x.to_acc(), y.to_acc()));
            }
            return;
        }
        let mut left = [T::Acc::default(); BLOCK];
        let mut right = [T::Acc::default(); BLOCK];
        for (block, ys) in xs.chunks_mut(BLOCK).zip(ys.chunks(BLOCK)) {
            let n = block.len();
            T::load(block, &mut left[..n]);
            T::load(ys, &mut right[..n]);
            for (l, &r) in left[..n].iter_mut().zip(&right[..n]) {
                *l = f.call::<FUSED>(*l, r);
            }
            T::store(&left[..n], block);
        }
    }
}

/// A float element type that kernels can compute with: f32 and f64 compute in themselves,
/// bf16 and f16 in f32.
pub trait FloatElement: Element + Float {
    /// The type arithmetic is done in.
    type Acc: Special;
    /// True when `Acc` is the element type itself (f32, f64): no widening.
    const NATIVE: bool;

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
}

macro_rules! float_self {
    ($($t:ty),*) => {$(
        impl FloatElement for $t {
            type Acc = $t;
            const NATIVE: bool = true;
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
        }
    )*};
}

float_self!(f32, f64);

macro_rules! float_half {
    ($($t:ty),*) => {$(
        impl FloatElement for $t {
            type Acc = f32;
            const NATIVE: bool = false;
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

/// `y[i] = f(x[i])` computed in `T::Acc`, vectorised ([`map_slice`]) and parallel over the
/// context.
pub fn unary<T: FloatElement, F: Map1<T::Acc>>(ctx: &Context, x: &Tensor, f: &F) -> Result<Tensor> {
    let src = x.as_slice::<T>()?;
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), T::DTYPE);
    for_chunks(ctx, out.as_mut_slice::<T>()?, 1, |start, chunk| {
        map_slice(f, &src[start..start + chunk.len()], chunk);
    });
    Ok(out)
}

/// `z[i] = f(x[i], y[i])` over two tensors of the same shape, computed in `T::Acc`
/// ([`map2_slice`]).
pub fn zip<T: FloatElement, F: Map2<T::Acc>>(
    ctx: &Context,
    x: &Tensor,
    y: &Tensor,
    f: &F,
) -> Result<Tensor> {
    let (a, b) = (x.as_slice::<T>()?, y.as_slice::<T>()?);
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), T::DTYPE);
    for_chunks(ctx, out.as_mut_slice::<T>()?, 1, |start, chunk| {
        let end = start + chunk.len();
        map2_slice(f, &a[start..end], &b[start..end], chunk);
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    /// A kernel large enough that a closure of it was not inlined (as gelu's).
    struct Wide;

    impl Map1<f32> for Wide {
        #[inline(always)]
        fn call<const FUSED: bool>(&self, x: f32) -> f32 {
            (x * x + 1.0).sqrt() / (x.abs() + 2.0) - x * 0.25
        }
    }

    fn wide(x: f32) -> f32 {
        (x * x + 1.0).sqrt() / (x.abs() + 2.0) - x * 0.25
    }

    #[test]
    fn map_slices_equal_plain_loops_at_every_length() {
        for len in [0, 1, 7, 16, 17, 511, 513, 1029] {
            let xs: Vec<f32> = (0..len).map(|i| i as f32 * 0.37 - 50.0).collect();
            let ys: Vec<f32> = (0..len).map(|i| 3.0 - i as f32 * 0.11).collect();
            let mut out = vec![f32::NAN; len];
            map_slice(&Wide, &xs, &mut out);
            assert_eq!(out, xs.iter().map(|&x| wide(x)).collect::<Vec<_>>(), "len {len}");
            map2_slice(&|x: f32, y: f32| x * y - y, &xs, &ys, &mut out);
            let plain: Vec<f32> = xs.iter().zip(&ys).map(|(x, y)| x * y - y).collect();
            assert_eq!(out, plain, "len {len}");
            let sub = |x: f32, y: f32| x - y;
            map_slice(&FixLeft(&sub, 10.0), &xs, &mut out);
            assert_eq!(out, xs.iter().map(|x| 10.0 - x).collect::<Vec<_>>(), "len {len}");
            map_slice(&FixRight(&sub, 10.0), &xs, &mut out);
            assert_eq!(out, xs.iter().map(|x| x - 10.0).collect::<Vec<_>>(), "len {len}");
        }
    }

    #[test]
    fn half_slices_compute_in_f32_blocks() {
        let len = 2 * BLOCK + 3;
        let xs: Vec<bf16> = (0..len).map(|i| bf16::from_f32(i as f32 * 0.5 - 300.0)).collect();
        let mut out = vec![bf16::ZERO; len];
        map_slice(&Wide, &xs, &mut out);
        let plain: Vec<bf16> = xs.iter().map(|x| bf16::from_f32(wide(x.to_f32()))).collect();
        assert_eq!(out, plain);
        map2_slice(&|x: f32, y: f32| x + 2.0 * y, &xs, &xs, &mut out);
        let plain: Vec<bf16> = xs.iter().map(|x| bf16::from_f32(3.0 * x.to_f32())).collect();
        assert_eq!(out, plain);
    }
}
