//! [`super::NcclCommunicator`] on cudarc's `nccl` module (feature `cuda`).

use std::cell::Cell;
use std::ffi::{c_int, c_void};

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;
use meshflow_ops::cuda::CudaDevice;
use meshflow_ops::TensorMeta;

use super::*;

/// The newest config layout this build's bindings describe (NCCL 2.30).
const CONFIG_VERSION: u32 = 23_000;
const CONFIG_MAGIC: u32 = 0xcafe_beef;

pub(super) fn available() -> Result<()> {
    // The driver first: cudarc panics on any call into a library it cannot load, and every
    // communicator needs a CUDA context.
    // SAFETY: each check only tries to open the shared library by its candidate names.
    let (driver, nccl) =
        unsafe { (cudarc::driver::sys::is_culib_present(), sys::is_culib_present()) };
    let missing: Vec<&str> = [(driver, "libcuda (the NVIDIA driver)"), (nccl, "libnccl")]
        .into_iter()
        .filter(|(present, _)| !present)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NcclUnavailable { reason: format!("cannot load {}", missing.join(", ")) })
    }
}

impl NcclId {
    /// A fresh id from `ncclGetUniqueId`.
    pub fn generate() -> Result<Self> {
        available()?;
        let id =
            nccl::get_uniqueid().map_err(|error| nccl_error("get_unique_id", Rank(0), error))?;
        let mut bytes = [0u8; 128];
        bytes.iter_mut().zip(id.internal.iter()).for_each(|(byte, &c)| *byte = c as u8);
        Ok(NcclId { bytes })
    }

    fn raw(&self) -> sys::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; 128];
        internal
            .iter_mut()
            .zip(self.bytes.iter())
            .for_each(|(c, &byte)| *c = byte as std::ffi::c_char);
        sys::ncclUniqueId { internal }
    }
}

/// One rank's NCCL communicator on one GPU (`Send`, not `Sync`: one owner calls it).
pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: Rank,
    world_size: usize,
    config: NcclConfig,
    aborted: Cell<bool>,
    abort_request: NcclAbort,
}

// SAFETY: NCCL lets a communicator be used from any thread as long as calls on it do not
// overlap; `Cell` keeps the type `!Sync`, so only its one owner (of the moment) calls it.
// The CUDA calls it makes (cudarc streams and events) bind their context first.
unsafe impl Send for NcclCommunicator {}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if self.abort_request.reason().is_some() {
            // A failed job: destroying would wait for peers that may be gone.
            self.abort();
        } else if !self.aborted.get() {
            // SAFETY: `comm` came from a successful init and is destroyed once.
            let _ = unsafe { nccl::comm_destroy(self.comm) };
        }
    }
}

impl NcclCommunicator {
    /// Joins the communicator `id` as `rank` of `world_size` on GPU `device`, without
    /// blocking: waits at most `config.init_timeout`, then aborts.
    pub fn init(
        device: usize,
        id: &NcclId,
        rank: Rank,
        world_size: usize,
        config: NcclConfig,
    ) -> Result<Self> {
        Self::init_with_abort(device, id, rank, world_size, config, NcclAbort::default())
    }

    /// [`NcclCommunicator::init`] with an abort handle made beforehand (e.g. already
    /// watching the job's health), so that the wait for the other ranks ends on a failure.
    pub fn init_with_abort(
        device: usize,
        id: &NcclId,
        rank: Rank,
        world_size: usize,
        config: NcclConfig,
        abort: NcclAbort,
    ) -> Result<Self> {
        available()?;
        let driver = |error: cudarc::driver::DriverError| Error::Nccl {
            operation: "cuda",
            rank,
            reason: format!("{error:?}"),
        };
        let context = CudaContext::new(device).map_err(driver)?;
        let stream = context.new_stream().map_err(driver)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let mut settings = nonblocking_config();
        let size = i32::try_from(world_size).map_err(|_| Error::InvalidArgument {
            collective: "nccl_init",
            reason: format!("world size {world_size} too large"),
        })?;
        // SAFETY: `comm` and `settings` are valid for the duration of the call.
        unsafe {
            nccl::comm_init_rank_config(&mut comm, size, id.raw(), rank.0 as i32, &mut settings)
        }
        .map_err(|error| nccl_error("comm_init_rank_config", rank, error))?;
        let communicator = NcclCommunicator {
            comm,
            stream,
            rank,
            world_size,
            config,
            aborted: Cell::new(false),
            abort_request: abort,
        };
        communicator.settle("comm_init_rank_config", communicator.config.init_timeout)?;
        Ok(communicator)
    }

    /// This rank.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The handle that asks this communicator to abort (from any thread).
    pub fn abort_handle(&self) -> NcclAbort {
        self.abort_request.clone()
    }

    /// The communicator's asynchronous error, if any (aborts it on error).
    pub fn poll_async_error(&self, operation: &'static str) -> Result<NcclStatus> {
        if self.aborted.get() {
            return Err(self.failure(operation, "the communicator was aborted".into()));
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live (not aborted) and `state` is a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) }
            .result()
            .and_then(|_| state.result())
            .map_err(|error| {
                self.abort();
                nccl_error(operation, self.rank, error)
            })
    }

    /// Aborts the communicator: pending and future calls fail instead of hanging.
    pub fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: `comm` is live and aborted once.
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
    }

    /// Runs `enqueue` between `ncclGroupStart` and `ncclGroupEnd`, then waits for completion.
    pub fn group<T>(
        &self,
        operation: &'static str,
        enqueue: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        nccl::group_start().map_err(|error| nccl_error(operation, self.rank, error))?;
        let result = enqueue();
        let end = nccl::group_end().map_err(|error| nccl_error(operation, self.rank, error));
        let value = result?;
        end?;
        self.complete(operation)?;
        Ok(value)
    }

    /// All-reduce of a host tensor through the GPU (copy in, reduce, copy out).
    pub fn all_reduce_host(&self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        self.host_call(Call::AllReduce(operation), tensor)
    }

    /// All-gather of host tensors through the GPU: every member's input (all of one shape)
    /// concatenated along dim 0 in member order.
    pub fn all_gather_host(&self, tensor: &Tensor) -> Result<Tensor> {
        self.host_call(Call::AllGather, tensor)
    }

    /// Reduce-scatter of host tensors through the GPU: member `i` receives part `i` of dim 0
    /// of the reduction (dim 0 must divide by the world size).
    pub fn reduce_scatter_host(&self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        self.host_call(Call::ReduceScatter(operation), tensor)
    }

    /// Broadcast through the GPU: every member receives `root`'s tensor. The other members pass
    /// a tensor of the same shape and dtype, whose values are not read.
    pub fn broadcast_host(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.host_call(Call::Broadcast { root }, tensor)
    }

    /// Reduce through the GPU: `root` receives the reduction, the other members `None`.
    pub fn reduce_host(
        &self,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        let output = self.host_call(Call::Reduce { operation, root }, tensor)?;
        Ok((self.rank.0 == root).then_some(output))
    }

    /// All-to-all through the GPU: member `i` receives chunk `i` of dim 0 of every member's
    /// input (the balanced split of [`crate::chunk`]), concatenated in member order.
    pub fn all_to_all_host(&self, tensor: &Tensor) -> Result<Tensor> {
        self.host_call(Call::AllToAll, tensor)
    }

    /// All-reduce of a tensor on `device` (this communicator's GPU) into a new tensor there.
    ///
    /// Stream order (the same for every `*_device` collective): the collective's stream first
    /// waits for the work already issued on `device`'s stream (which produced `tensor`), and
    /// `device`'s stream then waits for the collective, so kernels issued on `device`
    /// afterwards read its output; this call returns once the collective has completed
    /// (polling for peer failures).
    pub fn all_reduce_device(
        &self,
        device: &CudaDevice,
        tensor: &Tensor,
        operation: ReduceOp,
    ) -> Result<Tensor> {
        self.device_call(Call::AllReduce(operation), device, tensor)
    }

    /// [`NcclCommunicator::all_gather_host`] on tensors of `device`.
    pub fn all_gather_device(&self, device: &CudaDevice, tensor: &Tensor) -> Result<Tensor> {
        self.device_call(Call::AllGather, device, tensor)
    }

    /// [`NcclCommunicator::reduce_scatter_host`] on tensors of `device`.
    pub fn reduce_scatter_device(
        &self,
        device: &CudaDevice,
        tensor: &Tensor,
        operation: ReduceOp,
    ) -> Result<Tensor> {
        self.device_call(Call::ReduceScatter(operation), device, tensor)
    }

    /// [`NcclCommunicator::broadcast_host`] on tensors of `device`.
    pub fn broadcast_device(
        &self,
        device: &CudaDevice,
        tensor: &Tensor,
        root: usize,
    ) -> Result<Tensor> {
        self.device_call(Call::Broadcast { root }, device, tensor)
    }

    /// [`NcclCommunicator::reduce_host`] on tensors of `device`.
    pub fn reduce_device(
        &self,
        device: &CudaDevice,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        let output = self.device_call(Call::Reduce { operation, root }, device, tensor)?;
        Ok((self.rank.0 == root).then_some(output))
    }

    /// [`NcclCommunicator::all_to_all_host`] on tensors of `device`.
    pub fn all_to_all_device(&self, device: &CudaDevice, tensor: &Tensor) -> Result<Tensor> {
        self.device_call(Call::AllToAll, device, tensor)
    }

    /// Runs `call` on a host tensor: copies it to a buffer of this communicator's stream, runs
    /// the collective into a second buffer and copies that back.
    fn host_call(&self, call: Call, tensor: &Tensor) -> Result<Tensor> {
        let operation = call.name();
        let types = nccl_types(operation, tensor.dtype(), call.reduction())?;
        let dims = call.output_dims(tensor.dims(), self.world_size, self.rank.0)?;
        let meta = TensorMeta::new(dims.clone(), tensor.dtype());
        let driver = |error: DriverError| self.failure(operation, format!("{error:?}"));
        let bytes = tensor.bytes()?;
        // At least one byte each: CUDA refuses empty allocations.
        let mut input = self.stream.alloc_zeros::<u8>(bytes.len().max(1)).map_err(driver)?;
        if !bytes.is_empty() {
            self.stream.memcpy_htod(bytes, &mut input).map_err(driver)?;
        }
        let mut output = self.stream.alloc_zeros::<u8>(meta.bytes().max(1)).map_err(driver)?;
        {
            let (source, _read) = input.device_ptr(&self.stream);
            let (target, _written) = output.device_ptr_mut(&self.stream);
            let buffers = Buffers::of(source, target, tensor);
            // SAFETY: `input` holds the tensor and `output` the output dims (checked above) on
            // this communicator's device; both live until the collective completes below.
            unsafe { self.enqueue(call, &buffers, types) }?;
        }
        self.complete(operation)?;
        let out = self.stream.clone_dtoh(&output).map_err(driver)?;
        Ok(Tensor::from_bytes(&out[..meta.bytes()], dims, tensor.dtype())?)
    }

    /// Runs `call` on a tensor of `device` into a new tensor there (stream order in
    /// [`NcclCommunicator::all_reduce_device`]).
    fn device_call(&self, call: Call, device: &CudaDevice, tensor: &Tensor) -> Result<Tensor> {
        let operation = call.name();
        let types = nccl_types(operation, tensor.dtype(), call.reduction())?;
        let dims = call.output_dims(tensor.dims(), self.world_size, self.rank.0)?;
        let driver = |error: DriverError| self.failure(operation, format!("{error:?}"));
        let output = device.uninitialized(&TensorMeta::new(dims, tensor.dtype()))?;
        let buffers = Buffers::of(device.pointer(tensor)?, device.pointer(&output)?, tensor);
        self.stream.join(device.stream()).map_err(driver)?;
        // SAFETY: both tensors live on this communicator's device, `output` with the dims of
        // `call` for `tensor`; this call holds both until the collective has completed.
        unsafe { self.enqueue(call, &buffers, types) }?;
        device.stream().join(&self.stream).map_err(driver)?;
        self.complete(operation)?;
        Ok(output)
    }

    /// Waits until the async state leaves `ncclInProgress` (after init or group end).
    fn settle(&self, operation: &'static str, limit: Duration) -> Result<()> {
        let interval = self.config.poll_interval;
        let waited = wait_for(limit, interval, &self.abort_request, || {
            Ok(self.poll_async_error(operation)? != NcclStatus::InProgress)
        })?;
        self.conclude(operation, waited, || format!("still in progress after {limit:?}"))
    }

    /// The result of a wait: on an abort request or at the deadline, aborts the
    /// communicator (ending the NCCL kernels its stream waits on) and names why.
    fn conclude(
        &self,
        operation: &'static str,
        waited: Waited,
        timed_out: impl FnOnce() -> String,
    ) -> Result<()> {
        let reason = match waited {
            Waited::Done => return Ok(()),
            Waited::Aborted(reason) => format!("aborted because the job failed ({reason})"),
            Waited::TimedOut => timed_out(),
        };
        self.abort();
        Err(self.failure(operation, reason))
    }

    /// Enqueues `call` from `buffers.source` into `buffers.target` on this communicator's
    /// stream (first refusing when an abort was requested).
    ///
    /// # Safety
    /// `source` holds the input that `buffers` describes and `target` the output dims of
    /// `call` for it, of the dtype of `types`, on this communicator's device; both stay alive
    /// until the collective has completed.
    unsafe fn enqueue(
        &self,
        call: Call,
        buffers: &Buffers,
        (dtype, op): (sys::ncclDataType_t, sys::ncclRedOp_t),
    ) -> Result<()> {
        let operation = call.name();
        if let Some(reason) = self.abort_request.reason() {
            let reason = format!("aborted because the job failed ({reason})");
            self.abort();
            return Err(self.failure(operation, reason));
        }
        let (source, target) = (buffers.source as *const c_void, buffers.target as *mut c_void);
        let (count, comm, stream) = (buffers.count, self.comm, self.stream.cu_stream() as _);
        let root = |root: usize| root as c_int;
        // SAFETY: the caller's contract; reduce-scatter writes `count / n` elements (the
        // output dims), all-gather `count · n`.
        let status = unsafe {
            match call {
                Call::AllReduce(_) => {
                    nccl::all_reduce(source, target, count, dtype, op, comm, stream)
                }
                Call::AllGather => nccl::all_gather(source, target, count, dtype, comm, stream),
                Call::ReduceScatter(_) => {
                    let part = count / self.world_size.max(1);
                    nccl::reduce_scatter(source, target, part, dtype, op, comm, stream)
                }
                Call::Broadcast { root: r } => {
                    nccl::broadcast(source, target, count, dtype, root(r), comm, stream)
                }
                Call::Reduce { root: r, .. } => {
                    nccl::reduce(source, target, count, dtype, op, root(r), comm, stream)
                }
                Call::AllToAll => return self.enqueue_all_to_all(buffers, dtype),
            }
        };
        status.map_err(|error| nccl_error(operation, self.rank, error))?;
        Ok(())
    }

    /// All-to-all as nccl-tests runs it: one `ncclSend` and one `ncclRecv` per member between
    /// `ncclGroupStart` and `ncclGroupEnd`. Rows `chunk(dim0, n, j)` of the input go to member
    /// `j`; the `chunk(dim0, n, i)` rows from member `j` land at part `j` of the output.
    ///
    /// # Safety
    /// As [`NcclCommunicator::enqueue`] for [`Call::AllToAll`].
    unsafe fn enqueue_all_to_all(
        &self,
        buffers: &Buffers,
        dtype: sys::ncclDataType_t,
    ) -> Result<()> {
        let (n, stream) = (self.world_size, self.stream.cu_stream() as _);
        let row = buffers.count.checked_div(buffers.rows).unwrap_or(0);
        let received = crate::chunk(buffers.rows, n, self.rank.0).len() * row;
        let address = |base: u64, elements: usize| base + (elements * buffers.element) as u64;
        let failed = |error| nccl_error("all_to_all", self.rank, error);
        nccl::group_start().map_err(failed)?;
        let enqueued = (0..n).try_for_each(|peer| {
            let sent = crate::chunk(buffers.rows, n, peer);
            let from = address(buffers.source, sent.start * row) as *const c_void;
            let into = address(buffers.target, peer * received) as *mut c_void;
            // SAFETY: the rows sent lie inside the input and the part received inside the
            // output (the dims of `Call::output_dims`), by the caller's contract.
            unsafe {
                nccl::send(from, sent.len() * row, dtype, peer as c_int, self.comm, stream)?;
                nccl::recv(into, received, dtype, peer as c_int, self.comm, stream)
            }
            .map(|_| ())
        });
        // The group is ended even when an enqueue failed, so that NCCL's group state is clean.
        let ended = nccl::group_end();
        enqueued.map_err(failed)?;
        ended.map_err(failed)?;
        Ok(())
    }

    /// Waits for the enqueued work on the stream, polling the async error and the abort
    /// request; aborts at the deadline.
    fn complete(&self, operation: &'static str) -> Result<()> {
        let limit = self.config.operation_timeout;
        self.settle(operation, limit)?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|error| self.failure(operation, format!("{error:?}")))?;
        let interval = self.config.poll_interval;
        let waited = wait_for(limit, interval, &self.abort_request, || {
            self.poll_async_error(operation)?;
            event.try_is_complete().map_err(|error| self.failure(operation, format!("{error:?}")))
        })?;
        self.conclude(operation, waited, || {
            format!("not complete after {limit:?}: a peer is dead or stuck")
        })
    }

    fn failure(&self, operation: &'static str, reason: String) -> Error {
        Error::Nccl { operation, rank: self.rank, reason }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every int field "undefined" (INT_MIN), the
/// pointers null.
fn nonblocking_config() -> sys::ncclConfig_t {
    // SAFETY: the config is plain old data; every field is overwritten below or meant to be
    // INT_MIN / null.
    let mut config: sys::ncclConfig_t = unsafe { std::mem::zeroed() };
    let words = std::mem::size_of::<sys::ncclConfig_t>() / 4;
    let pointer = &mut config as *mut sys::ncclConfig_t as *mut i32;
    // SAFETY: the struct is at least `words` 4-byte words long and 4-aligned.
    unsafe { std::slice::from_raw_parts_mut(pointer, words) }.fill(i32::MIN);
    let version =
        nccl::get_nccl_version().map(|v| (v as u32).min(CONFIG_VERSION)).unwrap_or(CONFIG_VERSION);
    config.size = std::mem::size_of::<sys::ncclConfig_t>();
    config.magic = CONFIG_MAGIC;
    config.version = version;
    config.blocking = 0;
    config.netName = std::ptr::null();
    config.commName = std::ptr::null();
    config
}

/// The addresses and sizes of one collective call.
struct Buffers {
    /// The input's device address.
    source: u64,
    /// The output's device address.
    target: u64,
    /// Elements of the input.
    count: usize,
    /// Dim 0 of the input (1 for a scalar).
    rows: usize,
    /// Bytes per element.
    element: usize,
}

impl Buffers {
    fn of(source: u64, target: u64, input: &Tensor) -> Self {
        let rows = input.dims().first().copied().unwrap_or(1);
        Buffers { source, target, count: input.numel(), rows, element: input.dtype().size() }
    }
}

/// NCCL's dtype for `dtype` and its reduction (`ncclSum` for the collectives that only move
/// data, which may then move bytes and booleans too).
fn nccl_types(
    collective: &'static str,
    dtype: DType,
    reduction: Option<ReduceOp>,
) -> Result<(sys::ncclDataType_t, sys::ncclRedOp_t)> {
    let data = match (dtype, reduction) {
        (DType::F32, _) => sys::ncclDataType_t::ncclFloat32,
        (DType::F64, _) => sys::ncclDataType_t::ncclFloat64,
        (DType::BF16, _) => sys::ncclDataType_t::ncclBfloat16,
        (DType::F16, _) => sys::ncclDataType_t::ncclFloat16,
        (DType::I64, _) => sys::ncclDataType_t::ncclInt64,
        (DType::I32, _) => sys::ncclDataType_t::ncclInt32,
        (DType::U8 | DType::Bool, None) => sys::ncclDataType_t::ncclUint8,
        (DType::U8 | DType::Bool, Some(operation)) => {
            return Err(not_reducible(collective, dtype, operation))
        }
    };
    let op = match reduction {
        Some(ReduceOp::Sum) | None => sys::ncclRedOp_t::ncclSum,
        Some(ReduceOp::Max) => sys::ncclRedOp_t::ncclMax,
    };
    Ok((data, op))
}

fn nccl_error(operation: &'static str, rank: Rank, error: NcclError) -> Error {
    Error::Nccl { operation, rank, reason: format!("{:?}", error.0) }
}
