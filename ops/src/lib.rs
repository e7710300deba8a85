//! Tensors and ops for meshflow.
//!
//! - [`DType`], [`Shape`], [`Tensor`] (contiguous row-major storage shared by reference counting),
//!   [`Device`].
//! - [`Op`]: the contract every op implements, one op per file under [`ops`].
//! - [`Context`]: a device's thread budget, which kernels run inside.
//! - [`cuda`]: GPU storage and kernels behind the `cuda` feature (typed errors without it).
//! - [`eager::Tape`]: runs ops at once and differentiates them ([`autodiff::gradients`]).

pub mod autodiff;
pub mod buffers;
pub mod context;
pub mod cpu;
pub mod creation;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod eager;
pub mod error;
pub mod io;
pub mod op;
pub mod ops;
pub mod random;
pub mod shape;
pub mod tensor;

pub use context::{Context, ProductSlot, DEFAULT_KEEP_WARM};
pub use device::Device;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use op::{check_inputs, emit1, Emit, Op, OpRef, Shard, Value};
pub use shape::Shape;
pub use tensor::{CpuStorage, Storage, Tensor, TensorMeta};
