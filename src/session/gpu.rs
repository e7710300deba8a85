//! Devices of a session on GPUs: where each device rank of this process runs ([`DeviceKind`])
//! and what a rank's worker does differently there ([`Backend`]).
//!
//! A rank on a GPU keeps its variables and the tensors of the step in flight in device memory
//! (`meshflow_ops::cuda`): feeds, constants and initial parameters are uploaded when a leaf act
//! takes them, every op runs through the rank's [`CudaDevice`] (cuBLAS and NVRTC kernels: every
//! op has a device kernel, none round-trips through the host), and only the fetched values (the
//! loss) are downloaded at the end of the step. Device buffers come from the device's caching allocator, so a step that makes
//! the same tensors as the step before allocates nothing.
//!
//! Stream order: all kernels of a rank are issued on its device's one stream, in the order of the
//! rank's chain of acts, so an act's consumers (same rank, same stream) may read its outputs at
//! once; the executor reports an act complete as soon as its kernels are enqueued
//! ([`super::events`] holds the rule for consumers on other streams).
//!
//! Boxing, step by step of a plan: a collective step over a group of GPU ranks of this process
//! (all-reduce `P -> B`, the data-parallel gradient; reduce-scatter `P -> S`; all-gather
//! `S -> B`; all-to-all `S(i) -> S(j)`) runs as one NCCL collective on device memory
//! ([`EvenStep`]: the step's tensor axis is moved to the front and back by permute kernels on
//! the device stream, none when it is axis 0, and pieces of an axis that does not divide by the
//! group are padded to one size and cut back after), on the communicator's own stream, ordered
//! after the device stream and before the device's next kernels, in the chain order every rank
//! shares. A local slice (`B -> S`) is a narrow on the device. Collectives over an axis shorter
//! than the group, zero fills, and copies between placements (a GPU and a CPU placement,
//! pipeline stages) go through host copies and the rank's host communicators (download, the
//! CPU step, upload).

use std::collections::HashMap;

use meshflow_comm::cluster::Health;
use meshflow_comm::nccl::{NcclAbort, NcclCommunicator, NcclConfig, NcclId};
use meshflow_comm::{Rank, ReduceOp};
use meshflow_ops::cuda::{self, CudaDevice};
use meshflow_ops::{Context, DType, Device, Op, Tensor};
use meshflow_placement::{BoxingPlan, BoxingStep};

use crate::exec::boxing::{self, apply_plan, local_slice, step_error, Comms};
use crate::exec::even::{narrow_box, EvenCollective, EvenStep};
use crate::{Error, Result};

/// Where the device ranks of this process run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceKind {
    /// Every rank is a CPU device: a thread with its kernel budget. The default.
    #[default]
    Cpu,
    /// The i-th device rank of this process runs on GPU i (`Device::Cuda(i)`).
    Cuda,
    /// The i-th device rank of this process runs on the i-th device of the list (CPU and GPU
    /// ranks mixed; tensors cross between them through host copies).
    Each(Vec<Device>),
}

impl DeviceKind {
    /// The device of the `local`-th device rank of this process.
    pub fn device(&self, local: usize) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => Ok(Device::Cuda(local)),
            DeviceKind::Each(devices) => devices.get(local).copied().ok_or_else(|| {
                Error::Runtime(format!(
                    "the session has a device rank {local} but DeviceKind::Each lists {} devices",
                    devices.len()
                ))
            }),
        }
    }
}

/// Where one rank keeps its tensors and runs its kernels.
pub enum Backend {
    /// Host memory and the CPU kernels.
    Cpu,
    /// A GPU.
    Cuda(Gpu),
}

/// A rank on a GPU: its device and its NCCL communicators by group.
pub struct Gpu {
    device: CudaDevice,
    nccl: HashMap<Vec<usize>, NcclCommunicator>,
}

impl Backend {
    /// The backend of a rank on `device`: opening a GPU checks the driver and libraries first, so
    /// a machine without them gets `Error::Ops(Error::Device)` naming the device, not a panic.
    pub fn open(device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            Device::Cuda(ordinal) => {
                let device = CudaDevice::new(ordinal)?;
                Ok(Backend::Cuda(Gpu { device, nccl: HashMap::new() }))
            }
        }
    }

    /// The device this rank runs on.
    pub fn device(&self) -> Device {
        match self {
            Backend::Cpu => Device::Cpu,
            Backend::Cuda(gpu) => gpu.device.device(),
        }
    }

    /// The GPU, on a GPU rank.
    pub fn gpu(&self) -> Option<&CudaDevice> {
        match self {
            Backend::Cpu => None,
            Backend::Cuda(gpu) => Some(&gpu.device),
        }
    }

    /// Runs `op` on `inputs`: on the CPU within `ctx`'s thread budget, on a GPU through its
    /// device (host inputs, e.g. a variable set from a checkpoint, are uploaded first).
    pub fn forward(&self, ctx: &Context, op: &dyn Op, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self {
            Backend::Cpu => Ok(ctx.install(|| op.forward(ctx, inputs))?),
            Backend::Cuda(gpu) => {
                let resident = inputs.iter().map(|t| gpu.device.to_device(t));
                let resident = resident.collect::<meshflow_ops::Result<Vec<_>>>()?;
                Ok(gpu.device.forward(op, &resident)?)
            }
        }
    }

    /// `tensor` where this rank keeps its tensors (a host tensor stays as it is on the CPU).
    pub fn upload(&self, tensor: Tensor) -> Result<Tensor> {
        match self {
            Backend::Cpu => Ok(cuda::to_host(&tensor)?),
            Backend::Cuda(gpu) => Ok(gpu.device.to_device(&tensor)?),
        }
    }

    /// A host copy of `tensor` (shared when it already is on the host).
    pub fn download(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(cuda::to_host(tensor)?)
    }

    /// Applies a boxing plan to this rank's shard (see the module doc for which path a step
    /// takes on a GPU).
    pub fn apply_plan(
        &mut self,
        plan: &BoxingPlan,
        dtype: DType,
        local: Option<Tensor>,
        comms: &mut Comms,
    ) -> Result<Option<Tensor>> {
        let Backend::Cuda(gpu) = self else {
            return apply_plan(plan, dtype, local, comms);
        };
        let mut current = local;
        for step in &plan.steps {
            current = gpu
                .apply_step(&plan.logical, dtype, step, current, comms)
                .map_err(|e| step_error(step, e))?;
        }
        Ok(current)
    }

    /// Joins the NCCL communicator `id` of the GPU ranks `group`, when this rank is one of them
    /// (a CPU rank never is: groups get NCCL only when all their members are GPUs). A failure
    /// recorded in `health` (a device thread's failed act, a lost peer) aborts the communicator
    /// (`ncclCommAbort`), so its waits, the join included, end with an error at once.
    pub fn join_nccl(
        &mut self,
        rank: usize,
        group: &[usize],
        id: &NcclId,
        health: &Health,
    ) -> Result<()> {
        let (Backend::Cuda(gpu), Some(index)) = (self, group.iter().position(|&r| r == rank))
        else {
            return Ok(());
        };
        let Device::Cuda(ordinal) = gpu.device.device() else {
            return Err(Error::Runtime(format!("rank {rank}: a GPU backend on the host")));
        };
        let (config, abort) = (NcclConfig::default(), NcclAbort::default());
        abort.watch(health);
        let (member, size) = (Rank(index), group.len());
        let communicator =
            NcclCommunicator::init_with_abort(ordinal, id, member, size, config, abort)?;
        gpu.nccl.insert(group.to_vec(), communicator);
        Ok(())
    }
}

impl Gpu {
    /// One step of a boxing plan on this GPU rank's shard (the module doc says which path).
    fn apply_step(
        &self,
        logical: &[usize],
        dtype: DType,
        step: &BoxingStep,
        local: Option<Tensor>,
        comms: &mut Comms,
    ) -> Result<Option<Tensor>> {
        if let Some(local) = &local {
            // (A host shard, e.g. a variable just loaded from a checkpoint, is uploaded first.)
            if let Some(even) = EvenStep::of(logical, step, comms.rank, local.dims())? {
                if let Some(communicator) = self.nccl.get(&even.group) {
                    let local = self.device.to_device(local)?;
                    return self.even_collective(&even, &local, communicator).map(Some);
                }
            }
            if let Some((offsets, shape)) = local_slice(logical, step, comms.rank)? {
                return self.slice(self.device.to_device(local)?, &offsets, &shape).map(Some);
            }
        }
        let host = local.as_ref().map(cuda::to_host).transpose()?;
        let out = boxing::apply_step(logical, dtype, step, host, comms)?;
        Ok(out.map(|t| self.device.to_device(&t)).transpose()?)
    }

    /// `even`'s collective through NCCL on device memory, its reorders as device kernels.
    fn even_collective(
        &self,
        even: &EvenStep,
        local: &Tensor,
        communicator: &NcclCommunicator,
    ) -> Result<Tensor> {
        let mut run = |op: &dyn Op, inputs: &[Tensor]| self.run(op, inputs);
        let sent = even.prepare(local, &mut run)?;
        let device = &self.device;
        let received = match even.collective {
            EvenCollective::AllReduce => {
                communicator.all_reduce_device(device, &sent, ReduceOp::Sum)
            }
            EvenCollective::AllGather => communicator.all_gather_device(device, &sent),
            EvenCollective::ReduceScatter => {
                communicator.reduce_scatter_device(device, &sent, ReduceOp::Sum)
            }
            EvenCollective::AllToAll => communicator.all_to_all_device(device, &sent),
        }?;
        even.finish(&received, &mut run)
    }

    /// The box of `local` at `offsets` of `shape`, one narrow kernel per axis it cuts.
    fn slice(&self, local: Tensor, offsets: &[usize], shape: &[usize]) -> Result<Tensor> {
        let mut run = |op: &dyn Op, inputs: &[Tensor]| self.run(op, inputs);
        narrow_box(&mut run, local, offsets, shape)
    }

    /// `op`'s single output on this GPU (the reorders and slices of boxing).
    fn run(&self, op: &dyn Op, inputs: &[Tensor]) -> Result<Tensor> {
        Ok(self.device.forward(op, inputs)?.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_place_local_ranks() {
        assert_eq!(DeviceKind::Cpu.device(3).expect("cpu"), Device::Cpu);
        assert_eq!(DeviceKind::Cuda.device(1).expect("gpu 1"), Device::Cuda(1));
        let mixed = DeviceKind::Each(vec![Device::Cuda(0), Device::Cpu]);
        assert_eq!(mixed.device(1).expect("listed"), Device::Cpu);
        let error = mixed.device(2).expect_err("not listed");
        assert!(error.to_string().contains("lists 2 devices"), "{error}");
    }

    #[test]
    fn the_cpu_backend_runs_host_kernels_and_keeps_host_tensors() {
        let backend = Backend::open(Device::Cpu).expect("a CPU backend");
        assert_eq!(backend.device(), Device::Cpu);
        assert!(backend.gpu().is_none());
        let x = Tensor::from_vec(vec![1.0f32, 2.0], [2]).expect("x");
        let y = Tensor::from_vec(vec![0.5f32, -4.0], [2]).expect("y");
        let ctx = Context::default();
        let op = meshflow_ops::ops::add::Add;
        let sum = backend.forward(&ctx, &op, &[x.clone(), y]).expect("add");
        assert_eq!(sum[0].to_vec::<f32>().expect("f32"), vec![1.5, -2.0]);
        let kept = backend.upload(x.clone()).expect("upload");
        assert!(std::sync::Arc::ptr_eq(kept.storage(), x.storage()), "no copy on the host");
    }
}
