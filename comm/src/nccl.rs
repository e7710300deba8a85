//! NCCL between GPUs, through cudarc's `nccl` module (feature `cuda`).
//!
//! One [`NcclCommunicator`] per GPU device thread: it may move to another thread (NCCL allows
//! a communicator to be used from any thread, one call at a time) but is not `Sync`, so its
//! owner makes every call; a session keeps it in the rank's worker. The [`NcclId`] is made on
//! one rank and shared out of band (in memory inside a process; its 128 bytes travel over the
//! rendezvous between processes). Communicators are created non-blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`) and every call is followed by polling `ncclCommGetAsyncError` and the stream,
//! with the deadline of [`NcclConfig`]: a dead peer ends in `ncclCommAbort` and an error, not a
//! hang. A communicator also ends its waits when the job fails: its [`NcclAbort`] handle, set
//! from another thread (e.g. by [`Health::on_failure`] through [`NcclAbort::watch`]), is seen at
//! the next poll, and the owner calls `ncclCommAbort`, which ends the NCCL kernels its stream
//! waits on; the wait returns [`Error::Nccl`] naming the failure. Without the feature, or without
//! `libnccl` at run time, every constructor returns [`Error::NcclUnavailable`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use meshflow_ops::{DType, Tensor};

use crate::cluster::Health;
use crate::{Error, Rank, ReduceOp, Result};

/// Deadlines of the NCCL wrapper.
#[derive(Clone, Debug, PartialEq)]
pub struct NcclConfig {
    /// Limit on creating the communicator (all ranks must join). Default 60 s.
    pub init_timeout: Duration,
    /// Limit on one collective, from enqueue to completion on the stream. Default 60 s.
    pub operation_timeout: Duration,
    /// Sleep between two polls of the stream and the async error. Default 100 µs.
    pub poll_interval: Duration,
}

impl Default for NcclConfig {
    fn default() -> Self {
        NcclConfig {
            init_timeout: Duration::from_secs(60),
            operation_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_micros(100),
        }
    }
}

/// The unique id that every rank of one NCCL communicator must receive (128 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId {
    bytes: [u8; 128],
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// An id received from the rank that generated it.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        NcclId { bytes }
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.bytes
    }
}

/// Checks that the NCCL backend can be used: compiled with `cuda` and `libnccl` loadable.
pub fn nccl_available() -> Result<()> {
    imp::available()
}

fn not_reducible(collective: &'static str, dtype: DType, operation: ReduceOp) -> Error {
    Error::UnsupportedDType { collective, operation: operation.name(), dtype }
}

/// A request, from any thread, that a communicator abort: its owner sees it at the next poll of
/// a wait (every [`NcclConfig::poll_interval`]) or at the next collective, calls
/// `ncclCommAbort`, and the call returns [`Error::Nccl`] with the reason. Clones share the
/// request; the first reason wins.
#[derive(Clone, Debug, Default)]
pub struct NcclAbort {
    reason: Arc<OnceLock<String>>,
}

impl NcclAbort {
    /// Asks for the abort (once; later reasons are dropped).
    pub fn request(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
    }

    /// The reason, once an abort is requested.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// Requests the abort when `health` records a failure (at once if it already has), naming
    /// the failed rank: a failed device thread or peer process then ends this communicator's
    /// waits instead of leaving them to their timeout.
    pub fn watch(&self, health: &Health) {
        let abort = self.clone();
        health.on_failure(move |failure| {
            abort.request(format!("rank {} failed: {}", failure.rank, failure.reason))
        });
    }
}

/// How a wait of the wrapper ended.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, PartialEq, Eq)]
enum Waited {
    /// The condition held.
    Done,
    /// An abort was requested, for this reason.
    Aborted(String),
    /// The limit passed first.
    TimedOut,
}

/// Polls `done` every `interval` until it holds, `abort` is requested or `limit` passes; an
/// error of `done` ends the wait at once.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn wait_for(
    limit: Duration,
    interval: Duration,
    abort: &NcclAbort,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Waited> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(reason) = abort.reason() {
            return Ok(Waited::Aborted(reason.to_string()));
        }
        if done()? {
            return Ok(Waited::Done);
        }
        if Instant::now() > deadline {
            return Ok(Waited::TimedOut);
        }
        std::thread::sleep(interval);
    }
}

pub use imp::NcclCommunicator;

#[cfg(not(feature = "cuda"))]
mod imp {
    use std::marker::PhantomData;

    use super::*;

    const REASON: &str = "meshflow-comm was built without the `cuda` feature";

    pub(super) fn available() -> Result<()> {
        Err(Error::NcclUnavailable { reason: REASON.into() })
    }

    impl NcclId {
        /// A fresh id from `ncclGetUniqueId`.
        pub fn generate() -> Result<Self> {
            Err(Error::NcclUnavailable { reason: REASON.into() })
        }
    }

    /// One rank's NCCL communicator on one GPU (`Send`, not `Sync`: one owner calls it).
    pub struct NcclCommunicator {
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
            Err(Error::NcclUnavailable { reason: REASON.into() })
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
            Err(Error::NcclUnavailable { reason: REASON.into() })
        }

        /// The handle that asks this communicator to abort.
        pub fn abort_handle(&self) -> NcclAbort {
            NcclAbort::default()
        }

        /// All-reduce of a host tensor through the GPU (copy in, reduce, copy out).
        pub fn all_reduce_host(&self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
            Err(not_reducible("all_reduce", tensor.dtype(), operation))
        }

        /// All-reduce of a tensor on `device` (this communicator's GPU) into a new tensor there.
        pub fn all_reduce_device(
            &self,
            _device: &meshflow_ops::cuda::CudaDevice,
            _tensor: &Tensor,
            _operation: ReduceOp,
        ) -> Result<Tensor> {
            Err(Error::NcclUnavailable { reason: REASON.into() })
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::cell::Cell;

    use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};
    use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
    use cudarc::nccl::sys;

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
            let id = nccl::get_uniqueid()
                .map_err(|error| nccl_error("get_unique_id", Rank(0), error))?;
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

        /// All-reduce of a host tensor through the GPU (copy in, reduce in place, copy out).
        pub fn all_reduce_host(&self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
            let (dtype, op) = nccl_types("all_reduce", tensor.dtype(), operation)?;
            let driver = |error: cudarc::driver::DriverError| {
                self.failure("all_reduce", format!("{error:?}"))
            };
            let mut buffer = self.stream.clone_htod(tensor.bytes()?).map_err(driver)?;
            {
                let (pointer, _record) = buffer.device_ptr_mut(&self.stream);
                // SAFETY: the buffer holds numel elements of `dtype` on this communicator's device.
                unsafe { self.enqueue_all_reduce(pointer, pointer, tensor.numel(), (dtype, op)) }?;
            }
            self.complete("all_reduce")?;
            let bytes = self.stream.clone_dtoh(&buffer).map_err(driver)?;
            let _ = buffer.device_ptr(&self.stream);
            Ok(Tensor::from_bytes(&bytes, tensor.shape().clone(), tensor.dtype())?)
        }

        /// All-reduce of a tensor on `device` (this communicator's GPU) into a new tensor there.
        ///
        /// Stream order: the collective's stream first waits for the work already issued on
        /// `device`'s stream (which produced `tensor`), and `device`'s stream then waits for the
        /// collective, so kernels issued on `device` afterwards read the reduced values; this call
        /// returns once the collective has completed (polling for peer failures).
        pub fn all_reduce_device(
            &self,
            device: &meshflow_ops::cuda::CudaDevice,
            tensor: &Tensor,
            operation: ReduceOp,
        ) -> Result<Tensor> {
            let (dtype, op) = nccl_types("all_reduce", tensor.dtype(), operation)?;
            let driver = |error: cudarc::driver::DriverError| {
                self.failure("all_reduce", format!("{error:?}"))
            };
            let output = device.uninitialized(tensor.meta())?;
            let (source, target) = (device.pointer(tensor)?, device.pointer(&output)?);
            self.stream.join(device.stream()).map_err(driver)?;
            // SAFETY: both pointers address `numel` elements of `dtype` on this communicator's
            // device, alive until the collective completes below (this call holds both tensors).
            unsafe { self.enqueue_all_reduce(source, target, tensor.numel(), (dtype, op)) }?;
            device.stream().join(&self.stream).map_err(driver)?;
            self.complete("all_reduce")?;
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

        /// Enqueues an all-reduce of `count` elements from `source` into `target` (they may be
        /// the same) on this communicator's stream.
        ///
        /// # Safety
        /// Both addresses hold `count` elements of the dtype on this communicator's device and
        /// stay alive until the collective has completed.
        unsafe fn enqueue_all_reduce(
            &self,
            source: u64,
            target: u64,
            count: usize,
            (dtype, op): (sys::ncclDataType_t, sys::ncclRedOp_t),
        ) -> Result<()> {
            if let Some(reason) = self.abort_request.reason() {
                let reason = format!("aborted because the job failed ({reason})");
                self.abort();
                return Err(self.failure("all_reduce", reason));
            }
            // SAFETY: the caller's contract.
            unsafe {
                nccl::all_reduce(
                    source as _,
                    target as _,
                    count,
                    dtype,
                    op,
                    self.comm,
                    self.stream.cu_stream() as _,
                )
            }
            .map_err(|error| nccl_error("all_reduce", self.rank, error))?;
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
                event
                    .try_is_complete()
                    .map_err(|error| self.failure(operation, format!("{error:?}")))
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
        let version = nccl::get_nccl_version()
            .map(|v| (v as u32).min(CONFIG_VERSION))
            .unwrap_or(CONFIG_VERSION);
        config.size = std::mem::size_of::<sys::ncclConfig_t>();
        config.magic = CONFIG_MAGIC;
        config.version = version;
        config.blocking = 0;
        config.netName = std::ptr::null();
        config.commName = std::ptr::null();
        config
    }

    fn nccl_types(
        collective: &'static str,
        dtype: DType,
        operation: ReduceOp,
    ) -> Result<(sys::ncclDataType_t, sys::ncclRedOp_t)> {
        let data = match dtype {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::F64 => sys::ncclDataType_t::ncclFloat64,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            DType::I64 => sys::ncclDataType_t::ncclInt64,
            DType::I32 => sys::ncclDataType_t::ncclInt32,
            DType::U8 | DType::Bool => return Err(not_reducible(collective, dtype, operation)),
        };
        let op = match operation {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        };
        Ok((data, op))
    }

    fn nccl_error(operation: &'static str, rank: Rank, error: NcclError) -> Error {
        Error::Nccl { operation, rank, reason: format!("{:?}", error.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine with a GPU and NCCL: one rank (all that one GPU allows) reduces host and
    /// device tensors; the sum over one rank is the tensor itself.
    #[cfg(feature = "cuda")]
    #[test]
    fn one_rank_all_reduce_on_a_gpu() {
        use meshflow_ops::cuda::{to_host, CudaDevice};
        let device = match (nccl_available(), CudaDevice::new(0)) {
            (Ok(()), Ok(device)) => device,
            (nccl, device) => {
                eprintln!("skipped: {:?} / {:?}", nccl.err(), device.err());
                return;
            }
        };
        let id = NcclId::generate().expect("an id");
        let communicator =
            NcclCommunicator::init(0, &id, Rank(0), 1, NcclConfig::default()).expect("init");
        let values: Vec<f32> = (0..1 << 20).map(|i| (i % 97) as f32 - 48.0).collect();
        let tensor = Tensor::from_vec(values.clone(), [1 << 20]).expect("a tensor");
        let reduced = communicator.all_reduce_host(&tensor, ReduceOp::Sum).expect("host");
        assert_eq!(reduced.to_vec::<f32>().expect("f32"), values);
        let on_gpu = device.to_device(&tensor).expect("upload");
        let started = std::time::Instant::now();
        let reduced = communicator.all_reduce_device(&device, &on_gpu, ReduceOp::Sum).expect("gpu");
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(to_host(&reduced).expect("download").to_vec::<f32>().expect("f32"), values);
        println!("GPU-CHECK nccl all_reduce 1 rank 4 MiB f32: ok in {:.3} ms", seconds * 1e3);
    }

    /// On a machine with a GPU and NCCL: a failure recorded in the health aborts a one-rank
    /// communicator; its next collective returns the typed error naming the failure.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_failed_job_aborts_the_communicator() {
        use crate::cluster::PeerFailure;
        use meshflow_ops::cuda::CudaDevice;
        let device = match (nccl_available(), CudaDevice::new(0)) {
            (Ok(()), Ok(device)) => device,
            (nccl, device) => {
                eprintln!("skipped: {:?} / {:?}", nccl.err(), device.err());
                return;
            }
        };
        let (health, abort) = (Health::new(), NcclAbort::default());
        abort.watch(&health);
        let id = NcclId::generate().expect("an id");
        let config = NcclConfig::default();
        let communicator =
            NcclCommunicator::init_with_abort(0, &id, Rank(0), 1, config, abort).expect("init");
        let tensor = device.to_device(&Tensor::from_vec(vec![1.0f32; 1024], [1024]).expect("x"));
        let tensor = tensor.expect("upload");
        health.fail(PeerFailure { rank: 1, reason: "act failed".into() });
        let started = Instant::now();
        let error = communicator.all_reduce_device(&device, &tensor, ReduceOp::Sum).err();
        let text = format!("{error:?}");
        assert!(matches!(error, Some(Error::Nccl { .. })), "{text}");
        assert!(text.contains("rank 1 failed: act failed"), "{text}");
        println!("GPU-CHECK nccl abort on a failed job: typed error in {:?}", started.elapsed());
    }

    #[test]
    fn an_abort_request_ends_a_wait_with_its_reason() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let abort = NcclAbort::default();
        let requester = abort.clone();
        // The request comes after the second poll (not after a sleep, which a loaded machine
        // can outlast before the wait even starts).
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = polls.clone();
        let thread = std::thread::spawn(move || {
            while seen.load(Ordering::SeqCst) < 2 {
                std::thread::yield_now();
            }
            requester.request("rank 2 failed");
            requester.request("a later reason");
        });
        let interval = Duration::from_micros(100);
        let waited = wait_for(Duration::from_secs(60), interval, &abort, || {
            polls.fetch_add(1, Ordering::SeqCst);
            Ok(false)
        });
        thread.join().expect("the requester");
        assert_eq!(waited.expect("no poll error"), Waited::Aborted("rank 2 failed".into()));
        assert!(polls.load(Ordering::SeqCst) >= 2, "it polled until the request");
        let idle = NcclAbort::default();
        let short = Duration::from_millis(5);
        assert_eq!(wait_for(short, interval, &idle, || Ok(false)).ok(), Some(Waited::TimedOut));
        assert_eq!(wait_for(short, interval, &idle, || Ok(true)).ok(), Some(Waited::Done));
        let failing = wait_for(short, interval, &idle, || {
            Err(Error::Nccl { operation: "all_reduce", rank: Rank(0), reason: "broken".into() })
        });
        assert!(matches!(failing, Err(Error::Nccl { .. })));
        assert_eq!(abort.reason(), Some("rank 2 failed"), "the first reason wins");
    }

    #[test]
    fn a_failed_health_requests_the_abort_of_watching_communicators() {
        use crate::cluster::PeerFailure;
        let health = Health::new();
        let (early, late) = (NcclAbort::default(), NcclAbort::default());
        early.watch(&health);
        assert_eq!(early.reason(), None, "nothing failed yet");
        health.fail(PeerFailure { rank: 3, reason: "device rank 3: kernel failed".into() });
        assert_eq!(early.reason(), Some("rank 3 failed: device rank 3: kernel failed"));
        late.watch(&health);
        assert_eq!(late.reason(), early.reason(), "watching a failed job requests at once");
    }

    #[test]
    fn missing_nccl_is_a_typed_error() {
        // This machine has no GPU: either the feature is off or libnccl is absent.
        if nccl_available().is_ok() {
            return;
        }
        let error = NcclId::generate().expect_err("no NCCL here");
        assert!(matches!(error, Error::NcclUnavailable { .. }), "{error}");
        let id = NcclId::from_bytes([0; 128]);
        let error = NcclCommunicator::init(0, &id, Rank(0), 1, NcclConfig::default()).err();
        assert!(matches!(error, Some(Error::NcclUnavailable { .. })), "{error:?}");
    }
}
