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
//!
//! The collectives are those of [`crate::Communicator`], in its layouts (all-reduce,
//! all-gather, reduce-scatter, broadcast, reduce, and all-to-all as grouped send/recv, as
//! nccl-tests runs it), each in two forms: `*_device` on tensors of this communicator's GPU
//! (ordered after that device's stream, which in turn waits for the collective), and `*_host`
//! on host tensors (copied in and out through the communicator's stream). Every member calls
//! the same collectives in the same order with inputs of the same shape, as NCCL requires.

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

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn not_reducible(collective: &'static str, dtype: DType, operation: ReduceOp) -> Error {
    Error::UnsupportedDType { collective, operation: operation.name(), dtype }
}

/// One NCCL collective and what it takes besides its buffers.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// `ncclAllReduce`.
    AllReduce(ReduceOp),
    /// `ncclAllGather`.
    AllGather,
    /// `ncclReduceScatter`.
    ReduceScatter(ReduceOp),
    /// `ncclBroadcast` from member `root`.
    Broadcast { root: usize },
    /// `ncclReduce` to member `root`.
    Reduce { operation: ReduceOp, root: usize },
    /// Grouped `ncclSend`/`ncclRecv` with every member (as nccl-tests' alltoall).
    AllToAll,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Call {
    /// The name errors carry (`all_reduce`, …).
    fn name(self) -> &'static str {
        match self {
            Call::AllReduce(_) => "all_reduce",
            Call::AllGather => "all_gather",
            Call::ReduceScatter(_) => "reduce_scatter",
            Call::Broadcast { .. } => "broadcast",
            Call::Reduce { .. } => "reduce",
            Call::AllToAll => "all_to_all",
        }
    }

    /// The reduction, for the collectives that reduce.
    fn reduction(self) -> Option<ReduceOp> {
        match self {
            Call::AllReduce(operation)
            | Call::ReduceScatter(operation)
            | Call::Reduce { operation, .. } => Some(operation),
            _ => None,
        }
    }

    /// Member `rank`'s output dims for an input of `dims` on every one of `size` members, in
    /// the layouts of [`crate::collective`] that NCCL can serve: all-gather concatenates the
    /// members' inputs (all of one shape) along dim 0; reduce-scatter gives each member an
    /// equal part of dim 0 (NCCL has no uneven parts, so dim 0 must divide by the size);
    /// all-to-all sends rows `chunk(dim0, size, j)` to member `j` (the balanced split of
    /// [`crate::chunk`]), so member `i` receives `size` chunks of `chunk(dim0, size, i)` rows.
    /// A root outside the group or a scalar where rows are split is an
    /// [`Error::InvalidArgument`].
    fn output_dims(self, dims: &[usize], size: usize, rank: usize) -> Result<Vec<usize>> {
        let invalid = |reason: String| Error::InvalidArgument { collective: self.name(), reason };
        if let Call::Broadcast { root } | Call::Reduce { root, .. } = self {
            if root >= size {
                return Err(invalid(format!("root {root} outside a group of {size}")));
            }
        }
        let mut out = dims.to_vec();
        let rows = match (self, out.first_mut()) {
            (Call::AllReduce(_) | Call::Broadcast { .. } | Call::Reduce { .. }, _) => {
                return Ok(out)
            }
            (_, None) => return Err(invalid("a scalar has no rows to split".into())),
            (_, Some(rows)) => rows,
        };
        match self {
            Call::AllGather => *rows *= size,
            Call::ReduceScatter(_) if *rows % size != 0 => {
                return Err(invalid(format!(
                    "dim 0 of {dims:?} does not divide into {size} equal parts (NCCL's \
                     reduce-scatter has no uneven parts)"
                )));
            }
            Call::ReduceScatter(_) => *rows /= size,
            _ => *rows = size * crate::chunk(*rows, size, rank).len(),
        }
        Ok(out)
    }
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

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
mod stub;

#[cfg(feature = "cuda")]
use cuda as imp;
#[cfg(not(feature = "cuda"))]
use stub as imp;

pub use imp::NcclCommunicator;

#[cfg(test)]
mod tests {
    use super::*;

    /// GPU 0 when this machine has one and NCCL loads; otherwise `None`, after saying why (the
    /// GPU tests then pass without running: CI has no GPU).
    #[cfg(feature = "cuda")]
    fn gpu_or_skip() -> Option<meshflow_ops::cuda::CudaDevice> {
        match (nccl_available(), meshflow_ops::cuda::CudaDevice::new(0)) {
            (Ok(()), Ok(device)) => Some(device),
            (nccl, device) => {
                eprintln!("skipped: {:?} / {:?}", nccl.err(), device.err());
                None
            }
        }
    }

    /// On a machine with a GPU and NCCL: one rank (all that one GPU allows) reduces host and
    /// device tensors; the sum over one rank is the tensor itself.
    #[cfg(feature = "cuda")]
    #[test]
    fn one_rank_all_reduce_on_a_gpu() {
        use meshflow_ops::cuda::to_host;
        let Some(device) = gpu_or_skip() else { return };
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
        let Some(device) = gpu_or_skip() else { return };
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

    /// On a machine with a GPU and NCCL: every collective of one rank, on host and device
    /// tensors, returns its input (the closed form over one member), in f32 and (for the
    /// collectives that only move data) u8.
    #[cfg(feature = "cuda")]
    #[test]
    fn one_rank_runs_every_collective_on_a_gpu() {
        use meshflow_ops::cuda::to_host;
        let Some(device) = gpu_or_skip() else { return };
        let id = NcclId::generate().expect("an id");
        let communicator =
            NcclCommunicator::init(0, &id, Rank(0), 1, NcclConfig::default()).expect("init");
        let values: Vec<f32> = (0..6 * 1024).map(|i| (i % 89) as f32 - 40.0).collect();
        let host = Tensor::from_vec(values.clone(), [6, 1024]).expect("a tensor");
        let gpu = device.to_device(&host).expect("upload");
        let sum = ReduceOp::Sum;
        let c = &communicator;
        let outputs: Vec<(&str, Result<Option<Tensor>>)> = vec![
            ("all_gather_host", c.all_gather_host(&host).map(Some)),
            ("reduce_scatter_host", c.reduce_scatter_host(&host, sum).map(Some)),
            ("broadcast_host", c.broadcast_host(&host, 0).map(Some)),
            ("reduce_host", c.reduce_host(&host, sum, 0)),
            ("all_to_all_host", c.all_to_all_host(&host).map(Some)),
            ("all_gather_device", c.all_gather_device(&device, &gpu).map(Some)),
            ("reduce_scatter_device", c.reduce_scatter_device(&device, &gpu, sum).map(Some)),
            ("broadcast_device", c.broadcast_device(&device, &gpu, 0).map(Some)),
            ("reduce_device", c.reduce_device(&device, &gpu, sum, 0)),
            ("all_to_all_device", c.all_to_all_device(&device, &gpu).map(Some)),
        ];
        for (name, output) in outputs {
            let output = output.expect(name).expect("the root's output");
            assert_eq!(output.dims(), &[6, 1024], "{name}");
            let back = to_host(&output).expect("download").to_vec::<f32>().expect("f32");
            assert_eq!(back, values, "{name}");
        }
        let bytes = Tensor::from_vec((0..255u8).collect::<Vec<u8>>(), [255]).expect("u8");
        let moved = c.all_to_all_host(&bytes).expect("u8 all-to-all").to_vec::<u8>().expect("u8");
        assert_eq!(moved, (0..255u8).collect::<Vec<u8>>());
        let refused = c.all_reduce_host(&bytes, sum).err();
        assert!(matches!(refused, Some(Error::UnsupportedDType { .. })), "{refused:?}");
        let error = c.broadcast_host(&host, 1).err();
        assert!(matches!(error, Some(Error::InvalidArgument { .. })), "{error:?}");
        println!("GPU-CHECK nccl every collective 1 rank host and device: ok");
    }

    #[test]
    fn output_dims_follow_the_communicator_layouts() {
        let (sum, dims) = (ReduceOp::Sum, [6usize, 3]);
        assert_eq!(Call::AllReduce(sum).output_dims(&dims, 4, 2).ok(), Some(vec![6, 3]));
        assert_eq!(Call::AllGather.output_dims(&dims, 4, 2).ok(), Some(vec![24, 3]));
        assert_eq!(Call::ReduceScatter(sum).output_dims(&dims, 3, 1).ok(), Some(vec![2, 3]));
        assert_eq!(Call::Broadcast { root: 1 }.output_dims(&dims, 2, 0).ok(), Some(vec![6, 3]));
        let reduce = Call::Reduce { operation: sum, root: 0 };
        assert_eq!(reduce.output_dims(&dims, 2, 1).ok(), Some(vec![6, 3]));
        // All-to-all over 4 members: chunks of 6 rows are 2, 2, 1, 1; member i receives four
        // chunks of its size.
        let received: Vec<Vec<usize>> = (0..4)
            .map(|rank| Call::AllToAll.output_dims(&dims, 4, rank).expect("all-to-all"))
            .collect();
        assert_eq!(received, [vec![8, 3], vec![8, 3], vec![4, 3], vec![4, 3]]);
        let invalid = |call: Call, dims: &[usize], size: usize| {
            let error = call.output_dims(dims, size, 0).expect_err("refused");
            assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
            error.to_string()
        };
        assert!(invalid(Call::ReduceScatter(sum), &dims, 4).contains("4 equal parts"));
        assert!(invalid(Call::Broadcast { root: 2 }, &dims, 2).contains("root 2"));
        assert!(invalid(reduce, &dims, 0).contains("root 0"));
        for call in [Call::AllGather, Call::ReduceScatter(sum), Call::AllToAll] {
            assert!(invalid(call, &[], 2).contains("scalar"), "{}", call.name());
        }
        assert_eq!(Call::AllReduce(sum).output_dims(&[], 2, 0).ok(), Some(vec![]));
        let names: Vec<&str> = [
            Call::AllReduce(sum),
            Call::AllGather,
            Call::ReduceScatter(sum),
            Call::Broadcast { root: 0 },
            reduce,
            Call::AllToAll,
        ]
        .iter()
        .map(|call| call.name())
        .collect();
        assert_eq!(
            names,
            ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "all_to_all"]
        );
        assert_eq!((reduce.reduction(), Call::AllGather.reduction()), (Some(sum), None));
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
