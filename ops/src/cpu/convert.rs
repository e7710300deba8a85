//! Element conversions between every pair of dtypes (Rust `as` semantics: floats to integers
//! truncate toward zero and saturate; anything to bool is `value != 0`).

use crate::{DType, Element, Result, Tensor};

/// An element that converts to and from `f64` and `i64`.
pub trait Scalar: Element {
    /// The value as `f64`.
    fn to_f64(self) -> f64;
    /// The nearest element to `value`.
    fn from_f64(value: f64) -> Self;
    /// The value as `i64` (floats truncate).
    fn to_i64(self) -> i64;
    /// The element for `value` (saturating for narrower integers).
    fn from_i64(value: i64) -> Self;
}

macro_rules! scalar_primitive {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(value: f64) -> Self { value as $t }
            fn to_i64(self) -> i64 { self as i64 }
            fn from_i64(value: i64) -> Self {
                let wide = value as i128;
                wide.clamp(<$t>::MIN as i128, <$t>::MAX as i128) as $t
            }
        }
    )*};
}

scalar_primitive!(i64, i32, u8);

macro_rules! scalar_float {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(value: f64) -> Self { value as $t }
            fn to_i64(self) -> i64 { self as i64 }
            fn from_i64(value: i64) -> Self { value as $t }
        }
    )*};
}

scalar_float!(f32, f64);

macro_rules! scalar_half {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn to_f64(self) -> f64 { <$t>::to_f64(self) }
            fn from_f64(value: f64) -> Self { <$t>::from_f64(value) }
            fn to_i64(self) -> i64 { <$t>::to_f64(self) as i64 }
            fn from_i64(value: i64) -> Self { <$t>::from_f64(value as f64) }
        }
    )*};
}

scalar_half!(half::bf16, half::f16);

/// `x` converted element by element to `dtype`.
pub fn convert(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let integral = !x.dtype().is_float() && !dtype.is_float();
    let out = crate::dispatch_any!(x.dtype(), S => {
        crate::dispatch_any!(dtype, D => convert_typed::<S, D>(x, dtype, integral))
    })?;
    Ok(out)
}

fn convert_typed<S: Scalar, D: Scalar>(x: &Tensor, dtype: DType, integral: bool) -> Result<Tensor> {
    let src = x.as_slice::<S>()?;
    let mut out = Tensor::zeros(x.shape().clone(), dtype);
    let dst = out.as_mut_slice::<D>()?;
    if dtype == DType::Bool {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = D::from_i64((s.to_f64() != 0.0) as i64);
        }
    } else if integral {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = D::from_i64(s.to_i64());
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = D::from_f64(s.to_f64());
        }
    }
    Ok(out)
}
