//! Tensor creation: filled tensors and ranges (random ones are in [`crate::random`]).

use crate::cpu::convert::Scalar;
use crate::{DType, Error, Result, Shape, Tensor};

impl Tensor {
    /// A tensor of ones.
    pub fn ones(shape: impl Into<Shape>, dtype: DType) -> Tensor {
        Tensor::full(shape, 1.0, dtype)
    }

    /// A tensor with every element `value` (converted to `dtype` as a cast would).
    pub fn full(shape: impl Into<Shape>, value: f64, dtype: DType) -> Tensor {
        let mut out = Tensor::zeros(shape, dtype);
        if value != 0.0 {
            let filled: Result<()> = crate::dispatch_any!(dtype, T => {
                let element = if dtype == DType::Bool { T::from_f64(1.0) } else { T::from_f64(value) };
                out.as_mut_slice::<T>().map(|slice| slice.fill(element))
            });
            filled.expect("a fresh tensor is viewable as its own dtype");
        }
        out
    }

    /// A rank-0 tensor holding `value`.
    pub fn scalar(value: f64, dtype: DType) -> Tensor {
        Tensor::full(Shape::scalar(), value, dtype)
    }

    /// `start, start + step, …` up to (not including) `end`, as a 1-D tensor (like
    /// `torch.arange`); an error when `step` is 0 or points away from `end`.
    pub fn arange(start: f64, end: f64, step: f64, dtype: DType) -> Result<Tensor> {
        let valid = step != 0.0 && step.is_finite() && start.is_finite() && end.is_finite();
        if !valid || (end - start) * step < 0.0 || dtype == DType::Bool {
            return Err(Error::argument(
                "arange",
                format!("start {start}, end {end}, step {step} as {dtype}"),
            ));
        }
        let count = ((end - start) / step).ceil().max(0.0) as usize;
        let mut out = Tensor::zeros([count], dtype);
        crate::dispatch_any!(dtype, T => {
            for (i, v) in out.as_mut_slice::<T>()?.iter_mut().enumerate() {
                *v = T::from_f64(start + step * i as f64);
            }
            Ok::<(), Error>(())
        })?;
        Ok(out)
    }
}
