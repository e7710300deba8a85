//! Runs kernel code compiled for the vector instructions the CPU has, detected at run time.
//!
//! The crate is built for the baseline x86-64 target (SSE2), where the autovectorised loops of
//! the kernels use 128-bit registers and no FMA. Two ways up to AVX2 + FMA (x86-64-v3) and
//! AVX-512 (x86-64-v4, 16 f32 lanes):
//!
//! - `multiversion!` stamps out a function three times from
//!   one body, for the baseline, with `#[target_feature]` for x86-64-v3 and for x86-64-v4,
//!   and dispatches between them once per call. The code sits literally inside the feature
//!   boundary, and what it calls directly (`#[inline(always)]` helpers, by name, not through
//!   `impl Fn`) is inlined into it, so its loops are vectorised 8 or 16 lanes wide. Row
//!   kernels use it on their row-loop function: one dispatch per parallel task.
//! - [`vectorized`] calls a closure through a function compiled for x86-64-v4 or v3. The
//!   closure is only vectorised there when LLVM chooses to inline it, which it does for small
//!   closures and not reliably for a large loop or a kernel handed down as `impl Fn` (that one
//!   stayed 4-wide SSE, found with `perf annotate`); prefer `multiversion!` for hot kernels.

/// Lanes of the chunked reductions: a multiple of every SIMD width we meet (4, 8 or 16 f32s),
/// and two AVX2 registers of f32, so that two accumulations are in flight at once.
pub(crate) const LANES: usize = 16;

/// The lanes combined pairwise, halves onto halves (four vector steps for 16 lanes), instead of
/// one after another: a left fold is a chain of 15 dependent scalar additions, ~60 cycles per
/// row, which the short rows of a causal attention block paid on every row.
///
/// The tree starts from an opaque copy of the lanes (`black_box`, here a code-generation
/// barrier only: the values are unchanged). Folded straight from the caller's accumulators,
/// the tree made LLVM's SLP vectoriser pair the 16 lanes of the caller's loop two floats wide:
/// layer norm's variance ran in 8 `xmm` accumulators (`perf annotate`; forward `[1024, 256]` on
/// one thread 118 -> 83 µs with the barrier).
#[inline(always)]
pub(crate) fn fold_lanes<A: Copy>(lanes: [A; LANES], combine: impl Fn(A, A) -> A) -> A {
    let mut lanes = std::hint::black_box(lanes);
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] = combine(lanes[i], lanes[i + width]);
        }
    }
    lanes[0]
}

/// `combine` over `widen(x)` for every `x` of `xs`, from `start`: [`LANES`] independent
/// accumulators over the whole chunks (arrays, so that the lane loop has a constant length LLVM
/// unrolls and vectorises), folded by [`fold_lanes`], then the tail in order. The one lane
/// pattern of the row kernels' sums and maxima and of the row reductions.
#[inline(always)]
pub(crate) fn fold_chunked<I: Copy, A: Copy>(
    xs: &[I],
    start: A,
    widen: impl Fn(I) -> A,
    combine: impl Fn(A, A) -> A,
) -> A {
    let mut lanes = [start; LANES];
    let (chunks, tail) = xs.as_chunks::<LANES>();
    for chunk in chunks {
        for lane in 0..LANES {
            lanes[lane] = combine(lanes[lane], widen(chunk[lane]));
        }
    }
    let mut total = fold_lanes(lanes, &combine);
    for &x in tail {
        total = combine(total, widen(x));
    }
    total
}

/// Runs `f`, compiled for AVX-512 or AVX2 + FMA when the CPU has them and LLVM inlines `f`
/// (see the module doc).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_x86_v4() {
        // SAFETY: the CPU has every feature `x86_v4` is compiled for (checked just above).
        return unsafe { x86_v4(f) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_x86_v3() {
        // SAFETY: the CPU has every feature `x86_v3` is compiled for (checked just above).
        return unsafe { x86_v3(f) };
    }
    f()
}

/// True when the CPU has the AVX-512 subsets of x86-64-v4 (F, BW, CD, DQ, VL) besides
/// x86-64-v3 (what the x86-64-v4 versions are compiled for).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn has_x86_v4() -> bool {
    has_x86_v3()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512cd")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// True when the CPU has AVX2, FMA and BMI2 (what the x86-64-v3 versions are compiled for).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn has_x86_v3() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("bmi2")
}

/// # Safety
/// The CPU must have AVX2, FMA and BMI2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn x86_v3<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// # Safety
/// The CPU must have AVX2, FMA, BMI2 and the AVX-512 subsets of [`has_x86_v4`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[target_feature(enable = "avx512f,avx512bw,avx512cd,avx512dq,avx512vl")]
unsafe fn x86_v4<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Defines a function whose body is compiled three times, for the baseline target, for
/// x86-64-v3 (AVX2 + FMA + BMI2) and for x86-64-v4 (AVX-512), and that runs the best one the
/// CPU has, checked once per call.
///
/// The body is copied into every version; in each, the constant `FUSED` says whether
/// `mul_add` is a single FMA instruction there, for helpers with a `const FUSED: bool`
/// parameter (a fused multiply-add outside FMA code would be a slow libm call).
///
/// The function may have type parameters with one bound each and plain `name: Type`
/// arguments (no patterns, no `impl Trait`: pass kernels by name inside the body instead):
///
/// ```ignore
/// multiversion! {
///     /// Doubles every element.
///     pub(crate) fn double<T: Float>(xs: &mut [T]) {
///         xs.iter_mut().for_each(|x| *x = *x + *x);
///     }
/// }
/// ```
macro_rules! multiversion {
    (
        $(#[$attribute:meta])*
        $visibility:vis fn $name:ident $(<$($generic:ident: $bound:path),+ $(,)?>)?
        ($($argument:ident: $type:ty),* $(,)?) $(-> $output:ty)?
        $body:block
    ) => {
        $(#[$attribute])*
        $visibility fn $name $(<$($generic: $bound),+>)? ($($argument: $type),*) $(-> $output)? {
            #[inline(always)]
            fn portable $(<$($generic: $bound),+>)? ($($argument: $type),*) $(-> $output)? {
                /// `mul_add` is not one instruction here (a libm call): helpers take this as
                /// their `FUSED` parameter and multiply, then add.
                #[allow(dead_code)]
                const FUSED: bool = false;
                $body
            }

            /// # Safety
            /// The CPU must have AVX2, FMA and BMI2.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
            unsafe fn x86_v3 $(<$($generic: $bound),+>)? ($($argument: $type),*)
                $(-> $output)? {
                /// `mul_add` is one FMA instruction here.
                #[allow(dead_code)]
                const FUSED: bool = true;
                $body
            }

            /// # Safety
            /// The CPU must have AVX2, FMA, BMI2 and AVX-512 F, BW, CD, DQ, VL.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
            #[target_feature(enable = "avx512f,avx512bw,avx512cd,avx512dq,avx512vl")]
            unsafe fn x86_v4 $(<$($generic: $bound),+>)? ($($argument: $type),*)
                $(-> $output)? {
                /// `mul_add` is one FMA instruction here.
                #[allow(dead_code)]
                const FUSED: bool = true;
                $body
            }

            #[cfg(target_arch = "x86_64")]
            if $crate::cpu::simd::has_x86_v4() {
                // SAFETY: the CPU has every feature `x86_v4` is compiled for (checked above).
                return unsafe { x86_v4 $(::<$($generic),+>)? ($($argument),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::cpu::simd::has_x86_v3() {
                // SAFETY: the CPU has every feature `x86_v3` is compiled for (checked above).
                return unsafe { x86_v3 $(::<$($generic),+>)? ($($argument),*) };
            }
            portable $(::<$($generic),+>)? ($($argument),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        /// `y = 3x + 1`, into `ys`.
        fn affine<T: num_traits::Float>(xs: &[T], ys: &mut [T]) {
            let three = T::one() + T::one() + T::one();
            for (y, &x) in ys.iter_mut().zip(xs) {
                *y = x * three + T::one();
            }
        }
    }

    #[test]
    fn vectorized_code_computes_what_plain_code_does() {
        let xs: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25).collect();
        let plain: Vec<f32> = xs.iter().map(|x| x * 3.0 + 1.0).collect();
        let fast = vectorized(|| xs.iter().map(|x| x * 3.0 + 1.0).collect::<Vec<f32>>());
        assert_eq!(plain, fast);
        let mut stamped = vec![0.0f32; xs.len()];
        affine(&xs, &mut stamped);
        assert_eq!(plain, stamped);
    }
}
