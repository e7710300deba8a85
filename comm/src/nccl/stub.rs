//! [`super::NcclCommunicator`] in a build without the `cuda` feature: every constructor returns
//! [`Error::NcclUnavailable`], so no value of the type exists.

use std::marker::PhantomData;

use meshflow_ops::cuda::CudaDevice;

use super::*;

const REASON: &str = "meshflow-comm was built without the `cuda` feature";

pub(super) fn available() -> Result<()> {
    Err(unavailable())
}

fn unavailable() -> Error {
    Error::NcclUnavailable { reason: REASON.into() }
}

impl NcclId {
    /// A fresh id from `ncclGetUniqueId`.
    pub fn generate() -> Result<Self> {
        Err(unavailable())
    }
}

/// Values of the stub type never exist.
#[derive(Debug)]
enum Never {}

/// One rank's NCCL communicator on one GPU (`Send`, not `Sync`: one owner calls it). In this
/// build no value exists: [`NcclCommunicator::init`] always fails, so the methods below are
/// never reached.
pub struct NcclCommunicator {
    never: Never,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl NcclCommunicator {
    /// Joins the communicator `id` as `rank` of `world_size` on GPU `device`.
    pub fn init(
        _device: usize,
        _id: &NcclId,
        _rank: Rank,
        _world_size: usize,
        _config: NcclConfig,
    ) -> Result<Self> {
        Err(unavailable())
    }

    /// [`NcclCommunicator::init`] with an abort handle made beforehand (e.g. already
    /// watching the job's health), so that the wait for the other ranks ends on a failure.
    pub fn init_with_abort(
        _device: usize,
        _id: &NcclId,
        _rank: Rank,
        _world_size: usize,
        _config: NcclConfig,
        _abort: NcclAbort,
    ) -> Result<Self> {
        Err(unavailable())
    }

    /// This rank.
    pub fn rank(&self) -> Rank {
        match self.never {}
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        match self.never {}
    }

    /// The handle that asks this communicator to abort.
    pub fn abort_handle(&self) -> NcclAbort {
        match self.never {}
    }

    /// Aborts the communicator.
    pub fn abort(&self) {
        match self.never {}
    }

    /// All-reduce of a host tensor through the GPU.
    pub fn all_reduce_host(&self, _tensor: &Tensor, _operation: ReduceOp) -> Result<Tensor> {
        match self.never {}
    }

    /// All-gather of host tensors through the GPU.
    pub fn all_gather_host(&self, _tensor: &Tensor) -> Result<Tensor> {
        match self.never {}
    }

    /// Reduce-scatter of host tensors through the GPU.
    pub fn reduce_scatter_host(&self, _tensor: &Tensor, _operation: ReduceOp) -> Result<Tensor> {
        match self.never {}
    }

    /// Broadcast of `root`'s host tensor through the GPU.
    pub fn broadcast_host(&self, _tensor: &Tensor, _root: usize) -> Result<Tensor> {
        match self.never {}
    }

    /// Reduce of host tensors to `root` through the GPU.
    pub fn reduce_host(
        &self,
        _tensor: &Tensor,
        _operation: ReduceOp,
        _root: usize,
    ) -> Result<Option<Tensor>> {
        match self.never {}
    }

    /// All-to-all of host tensors through the GPU.
    pub fn all_to_all_host(&self, _tensor: &Tensor) -> Result<Tensor> {
        match self.never {}
    }

    /// All-reduce of a tensor on `device` into a new tensor there.
    pub fn all_reduce_device(
        &self,
        _device: &CudaDevice,
        _tensor: &Tensor,
        _operation: ReduceOp,
    ) -> Result<Tensor> {
        match self.never {}
    }

    /// All-gather of tensors on `device`.
    pub fn all_gather_device(&self, _device: &CudaDevice, _tensor: &Tensor) -> Result<Tensor> {
        match self.never {}
    }

    /// Reduce-scatter of tensors on `device`.
    pub fn reduce_scatter_device(
        &self,
        _device: &CudaDevice,
        _tensor: &Tensor,
        _operation: ReduceOp,
    ) -> Result<Tensor> {
        match self.never {}
    }

    /// Broadcast of `root`'s tensor on `device`.
    pub fn broadcast_device(
        &self,
        _device: &CudaDevice,
        _tensor: &Tensor,
        _root: usize,
    ) -> Result<Tensor> {
        match self.never {}
    }

    /// Reduce of tensors on `device` to `root`.
    pub fn reduce_device(
        &self,
        _device: &CudaDevice,
        _tensor: &Tensor,
        _operation: ReduceOp,
        _root: usize,
    ) -> Result<Option<Tensor>> {
        match self.never {}
    }

    /// All-to-all of tensors on `device`.
    pub fn all_to_all_device(&self, _device: &CudaDevice, _tensor: &Tensor) -> Result<Tensor> {
        match self.never {}
    }
}
