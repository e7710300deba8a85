//! One op per file. Each file holds the op type, its inference, SBP signatures (with the
//! per-device equation in the doc comment), gradient, CPU kernel, and a constructor function that
//! applies it through an [`crate::Emit`].

pub mod adamw;
pub mod add;
pub mod binary;
pub mod broadcast_to;
pub mod cast;
pub mod cross_entropy;
pub mod div;
pub mod embedding;
pub mod layer_norm;
pub mod log_softmax;
pub mod matmul;
pub(crate) mod matmul_kernel;
pub mod mul;
pub mod neg;
pub(crate) mod nn_rows;
pub mod reshape;
pub mod rms_norm;
pub mod sgd;
pub mod softmax;
pub mod sub;
pub mod sum;
