//! Devices a tensor can live on.

use std::fmt;

/// Where a tensor's storage lives.
///
/// `Cuda` exists in every build; without the `cuda` feature (or without a driver) creating storage
/// on it returns [`crate::Error::Device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
