//! Seeded random numbers: tensors drawn from normal and uniform distributions (a seed in, the
//! same tensor out), and a counter-based generator — a pure function of `(seed, index)` — for ops
//! such as dropout whose sharded runs must equal the single-device run.

use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

use crate::cpu::convert::Scalar;
use crate::{DType, Error, Result, Shape, Tensor};

impl Tensor {
    /// Samples of a normal distribution `N(mean, std²)`, reproducible from `seed`.
    pub fn randn(
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        seed: u64,
    ) -> Result<Tensor> {
        if !(std >= 0.0 && std.is_finite()) {
            return Err(Error::argument("randn", format!("std {std} must be finite and ≥ 0")));
        }
        let normal = Normal::new(mean, std)
            .map_err(|e| Error::argument("randn", format!("mean {mean}, std {std}: {e}")))?;
        sample(shape.into(), dtype, seed, "randn", normal)
    }

    /// Samples of a uniform distribution on `[low, high)`, reproducible from `seed`.
    pub fn rand_uniform(
        shape: impl Into<Shape>,
        low: f64,
        high: f64,
        dtype: DType,
        seed: u64,
    ) -> Result<Tensor> {
        let uniform = Uniform::new(low, high)
            .map_err(|e| Error::argument("rand_uniform", format!("[{low}, {high}): {e}")))?;
        sample(shape.into(), dtype, seed, "rand_uniform", uniform)
    }
}

fn sample(
    shape: Shape,
    dtype: DType,
    seed: u64,
    op: &'static str,
    distribution: impl Distribution<f64>,
) -> Result<Tensor> {
    if !dtype.is_float() {
        return Err(Error::dtype(op, &[dtype], "random tensors need a float dtype"));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Tensor::zeros(shape, dtype);
    crate::dispatch_float!(op, dtype, T => {
        for v in out.as_mut_slice::<T>()? {
            *v = <T as Scalar>::from_f64(rng.sample(&distribution));
        }
        Ok(())
    })?;
    Ok(out)
}

/// A 64-bit hash of `(seed, index)` (SplitMix64 finaliser over a Weyl step): a counter-based
/// generator, so element `index` gets the same number however the tensor is sharded.
pub fn hash(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` from [`hash`]`(seed, index)` (24 bits, exact in f32).
pub fn uniform_at(seed: u64, index: u64) -> f32 {
    (hash(seed, index) >> 40) as f32 / (1u64 << 24) as f32
}
