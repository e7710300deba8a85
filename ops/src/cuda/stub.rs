//! The backend's types in a build without the `cuda` feature: every constructor returns
//! [`Error::Device`], and values of these types never exist.

use crate::{Device, Error, Op, Result, Tensor, TensorMeta};

use super::pool::PoolStats;

const REASON: &str = "meshflow-ops was built without the `cuda` feature";

#[derive(Clone, Debug)]
enum Never {}

fn unavailable(device: Device) -> Error {
    Error::Device { device: device.to_string(), reason: REASON.into() }
}

/// Checks that the driver and CUDA libraries can be loaded: here, never.
pub fn check_libraries() -> Result<()> {
    Err(unavailable(Device::Cuda(0)))
}

/// Number of GPUs the driver sees: here, an error.
pub fn device_count() -> Result<usize> {
    Err(unavailable(Device::Cuda(0)))
}

/// One GPU: its context, stream, allocator and kernels (none exist in this build).
#[derive(Clone, Debug)]
pub struct CudaDevice {
    never: Never,
}

/// An event recorded on a device's stream (none exist in this build).
#[derive(Debug)]
pub struct DeviceEvent {
    never: Never,
}

/// GPU memory behind a tensor (none exists in this build).
#[derive(Debug)]
pub struct CudaStorage {
    never: Never,
}

impl CudaDevice {
    /// Opens GPU `ordinal`: without the `cuda` feature, always [`Error::Device`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Err(unavailable(Device::Cuda(ordinal)))
    }

    /// The device tag.
    pub fn device(&self) -> Device {
        match self.never {}
    }

    /// A copy of a host tensor on this device.
    pub fn to_device(&self, _tensor: &Tensor) -> Result<Tensor> {
        match self.never {}
    }

    /// Runs `op` on tensors of this device.
    pub fn forward(&self, _op: &dyn Op, _inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self.never {}
    }

    /// Waits until the stream has finished its work.
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }

    /// Records an event after the work issued so far.
    pub fn record(&self) -> Result<DeviceEvent> {
        match self.never {}
    }

    /// Allocator counters.
    pub fn pool_stats(&self) -> PoolStats {
        match self.never {}
    }

    /// Products issued through each cuBLAS path.
    pub fn product_paths(&self) -> ProductPaths {
        match self.never {}
    }

    /// Whether products may go through cuBLASLt.
    pub fn set_cublaslt(&self, _enabled: bool) {
        match self.never {}
    }

    /// The first product cuBLASLt refused.
    pub fn product_refusal(&self) -> Option<String> {
        match self.never {}
    }
}

/// Products a device issued through each cuBLAS path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProductPaths {
    /// Through cuBLASLt.
    pub lt: u64,
    /// Through the classic cuBLAS call.
    pub classic: u64,
    /// Of `classic`, those cuBLASLt refused.
    pub refused: u64,
}

impl DeviceEvent {
    /// True once the work before the event has finished.
    pub fn is_complete(&self) -> Result<bool> {
        match self.never {}
    }

    /// Blocks until the work before the event has finished.
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }
}

impl CudaStorage {
    /// The device the memory is on.
    pub fn device(&self) -> Device {
        match self.never {}
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// The error for reading this memory as host memory.
    pub fn not_on_host(&self) -> Error {
        match self.never {}
    }

    pub(super) fn to_host(&self, _meta: TensorMeta) -> Result<Tensor> {
        match self.never {}
    }
}
