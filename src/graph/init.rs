//! How a parameter gets its first value, evaluated shard by shard.
//!
//! A parameter's initial value is a description, not a tensor: every rank materialises only its
//! own region, so a model far larger than one host's memory can be built and compiled (the
//! planner compiles 1.3B-parameter GPTs without allocating their weights), and the value of an
//! element does not depend on how the tensor is sharded: `Normal` draws element `i` from a
//! counter-based generator (`meshflow_ops::random::hash(seed, i)`), so a checkpoint-free run on
//! 1 device and on DP2×TP2 start from bit-identical weights.

use meshflow_ops::random::hash;
use meshflow_ops::{DType, Tensor as HostTensor, TensorMeta};
use meshflow_placement::Region;

use crate::exec::layout::take_box;
use crate::{Error, Result};

/// A parameter's initial value.
#[derive(Clone, Debug)]
pub enum Init {
    /// An explicit logical value (shape and dtype must match the parameter's).
    Value(HostTensor),
    /// Every element `value`.
    Full(f64),
    /// Normal(mean, std), element `i` (row-major logical index) drawn from `(seed, i)` alone.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation (finite, ≥ 0).
        std: f64,
        /// Seed of the counter-based generator.
        seed: u64,
    },
}

impl Init {
    /// All zeros.
    pub const ZEROS: Init = Init::Full(0.0);

    /// Checks that this init can produce a value of `meta` (named `name` in errors).
    pub fn check(&self, name: &str, meta: &TensorMeta) -> Result<()> {
        match self {
            Init::Value(t) if t.meta() != meta => Err(Error::Graph(format!(
                "parameter {name}: initial value is {} {}, the parameter is {} {}",
                t.shape(),
                t.dtype(),
                meta.shape,
                meta.dtype
            ))),
            Init::Normal { std, .. } if !(std.is_finite() && *std >= 0.0) => Err(Error::Graph(
                format!("parameter {name}: normal init needs a finite std ≥ 0, got {std}"),
            )),
            Init::Normal { .. } if !meta.dtype.is_float() => Err(Error::Graph(format!(
                "parameter {name}: {} is not a floating dtype; give an explicit value",
                meta.dtype
            ))),
            _ => Ok(()),
        }
    }

    /// The values of `region` of a parameter of logical `meta`.
    pub fn region(&self, meta: &TensorMeta, region: &Region) -> Result<HostTensor> {
        match self {
            Init::Value(t) => take_box(t, &region.offsets, &region.shape),
            Init::Full(value) => Ok(HostTensor::full(region.shape.clone(), *value, meta.dtype)),
            Init::Normal { mean, std, seed } => {
                let values = normal_region(meta.shape.dims(), region, *mean, *std, *seed);
                let t = HostTensor::from_vec(values, region.shape.clone())?;
                Ok(if meta.dtype == DType::F64 { t } else { t.to_dtype(meta.dtype)? })
            }
        }
    }

    /// The whole logical value.
    pub fn whole(&self, meta: &TensorMeta) -> Result<HostTensor> {
        let dims = meta.shape.dims();
        self.region(meta, &Region { offsets: vec![0; dims.len()], shape: dims.to_vec() })
    }
}

impl From<HostTensor> for Init {
    fn from(t: HostTensor) -> Self {
        Init::Value(t)
    }
}

/// Normal samples of the elements of `region` of a tensor of `dims`, each from its logical
/// row-major index by Box–Muller over two counter-based uniforms.
fn normal_region(dims: &[usize], region: &Region, mean: f64, std: f64, seed: u64) -> Vec<f64> {
    let count: usize = region.shape.iter().product();
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return out;
    }
    let rank = dims.len();
    let strides: Vec<usize> =
        (0..rank).map(|k| dims[k + 1..].iter().product::<usize>()).collect::<Vec<_>>();
    let row = region.shape.last().copied().unwrap_or(1);
    let rows = count / row;
    let mut index = vec![0usize; rank.saturating_sub(1)];
    for _ in 0..rows {
        let mut base: usize = region.offsets.last().copied().unwrap_or(0);
        for (k, &i) in index.iter().enumerate() {
            base += (region.offsets[k] + i) * strides[k];
        }
        out.extend((0..row).map(|j| mean + std * standard_normal(seed, (base + j) as u64)));
        for k in (0..index.len()).rev() {
            index[k] += 1;
            if index[k] < region.shape[k] {
                break;
            }
            index[k] = 0;
        }
    }
    out
}

/// A standard normal sample for element `index` (Box–Muller, 53-bit uniforms in (0, 1]).
fn standard_normal(seed: u64, index: u64) -> f64 {
    let unit = |bits: u64| ((bits >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u1 = unit(hash(seed, index.wrapping_mul(2)));
    let u2 = unit(hash(seed, index.wrapping_mul(2).wrapping_add(1)));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dims: &[usize]) -> TensorMeta {
        TensorMeta::new(dims.to_vec(), DType::F32)
    }

    #[test]
    fn a_region_equals_the_same_box_of_the_whole() {
        let init = Init::Normal { mean: 0.5, std: 2.0, seed: 7 };
        let m = meta(&[4, 6, 5]);
        let whole = init.whole(&m).unwrap();
        let region = Region { offsets: vec![1, 2, 3], shape: vec![2, 3, 2] };
        let part = init.region(&m, &region).unwrap();
        let expected = take_box(&whole, &region.offsets, &region.shape).unwrap();
        assert_eq!(part.to_vec::<f32>().unwrap(), expected.to_vec::<f32>().unwrap());
    }

    #[test]
    fn normal_samples_have_the_asked_moments() {
        let init = Init::Normal { mean: 1.0, std: 0.02, seed: 3 };
        let values = init.whole(&meta(&[100_000])).unwrap().to_vec::<f32>().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 1.0).abs() < 0.02 * 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.02 * 0.02, "std {}", var.sqrt());
        let other = Init::Normal { mean: 1.0, std: 0.02, seed: 4 };
        assert_ne!(other.whole(&meta(&[8])).unwrap().to_vec::<f32>().unwrap(), values[..8]);
    }

    #[test]
    fn bad_inits_are_refused_naming_the_parameter() {
        let wrong = Init::Value(HostTensor::zeros([3], DType::F32));
        let error = wrong.check("w", &meta(&[4])).unwrap_err().to_string();
        assert!(error.contains("parameter w") && error.contains("[3]"), "{error}");
        let nan = Init::Normal { mean: 0.0, std: f64::NAN, seed: 0 };
        assert!(nan.check("w", &meta(&[4])).is_err());
        let ints = TensorMeta::new(vec![2], DType::I64);
        let normal = Init::Normal { mean: 0.0, std: 1.0, seed: 0 };
        assert!(normal.check("steps", &ints).unwrap_err().to_string().contains("i64"));
        assert!(Init::ZEROS.check("steps", &ints).is_ok());
        assert_eq!(Init::ZEROS.whole(&meta(&[2, 2])).unwrap().to_vec::<f32>().unwrap(), [0.0; 4]);
    }
}
