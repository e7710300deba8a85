//! One op per file. Each file holds the op type, its inference, SBP signatures (with the
//! per-device equation in the doc comment), gradient, CPU kernel, and a constructor function that
//! applies it through an [`crate::Emit`].

pub mod add;
pub mod binary;
pub mod broadcast_to;
pub mod cast;
pub mod div;
pub mod mul;
pub mod neg;
pub mod reshape;
pub mod sub;
pub mod sum;
