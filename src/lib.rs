//! meshflow: a distributed tensor runtime in the style of OneFlow.
//!
//! A training script builds one global, logical graph as if for one device; placement and SBP
//! annotations say how tensors are laid out over a mesh of devices. See `ARCHITECTURE.md`.

pub use meshflow_actor as actor;
pub use meshflow_comm as comm;
pub use meshflow_ops as ops;
pub use meshflow_placement as placement;

pub mod dist;
pub mod launch;

pub mod bench;
pub mod checkpoint;
pub mod compile;
pub mod data;
pub mod error;
pub mod exec;
pub mod flags;
pub mod graph;
pub mod nn;
pub mod plan;
pub mod schedule;
pub mod session;

pub use error::{Error, Result};
pub use graph::{Graph, Tensor};
