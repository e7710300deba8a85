//! Runs kernel code compiled for the vector instructions the CPU has, detected at run time.
//!
//! The crate is built for the baseline x86-64 target (SSE2), where the autovectorised loops of
//! the kernels use 128-bit registers and no FMA. [`vectorized`] calls a closure through a
//! function compiled with AVX2 + FMA (x86-64-v3) when the CPU has them; the closure is inlined
//! into it, so the loops inside are vectorised for 256-bit registers. Elsewhere it just calls the
//! closure. Kernels call it once per parallel task, around the task's whole loop.

/// Runs `f`, compiled for AVX2 + FMA when the CPU has them.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_x86_v3() {
        // SAFETY: the CPU has every feature `x86_v3` is compiled for (checked just above).
        return unsafe { x86_v3(f) };
    }
    f()
}

/// True when the CPU has AVX2, FMA and BMI2 (what the `*_v3` kernels are compiled for).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorized_code_computes_what_plain_code_does() {
        let xs: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25).collect();
        let plain: Vec<f32> = xs.iter().map(|x| x * 3.0 + 1.0).collect();
        let fast = vectorized(|| xs.iter().map(|x| x * 3.0 + 1.0).collect::<Vec<f32>>());
        assert_eq!(plain, fast);
    }
}
