//! Small CPU building blocks shared by the kernels: dtype dispatch and element-wise maps.

use num_traits::Float;

use crate::{Element, Result, Tensor};

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

/// `y[i] = f(x[i])` into a new tensor of the same shape and dtype.
pub fn map<T: Element>(x: &Tensor, f: impl Fn(T) -> T) -> Result<Tensor> {
    let data: Vec<T> = x.as_slice::<T>()?.iter().map(|&v| f(v)).collect();
    Tensor::from_vec(data, x.shape().clone())
}

/// A float element type that kernels can compute with.
pub trait FloatElement: Element + Float {}

impl<T: Element + Float> FloatElement for T {}
