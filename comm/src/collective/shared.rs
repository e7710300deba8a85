//! [`SharedGroup`]: collectives between device threads of one process, on shared buffers.
//!
//! Every member publishes its input (a reference-counted tensor: nothing is copied) and waits at
//! a barrier. Then each member does its own share of the work in parallel: for all-reduce it
//! reduces chunk `i` of all inputs straight into the one shared output buffer; for all-gather it
//! copies its own input into its place in the shared output; a second barrier ends the writes,
//! and every member returns the same output tensor (shared storage, copy-on-write). Broadcast
//! hands out the root's tensor itself. Every barrier wait has the group's timeout; a member that
//! never arrives is named in the error, and the group refuses further calls. A group built with
//! [`SharedGroup::watched`] also ends every wait at once when its [`Health`] records a failure
//! (a device thread whose act failed will never arrive).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshflow_ops::{CpuStorage, Storage, Tensor, TensorMeta};

use super::{
    check_root, concat_rows, mismatch, rows, slice_rows, Communicator, TransportCommunicator,
};
use crate::cluster::{Health, PeerFailure};
use crate::reduce::{check_reducible, chunk, reduce_into};
use crate::{Error, InProcessTransport, MessageKind, Rank, ReduceOp, Result};

/// Builds the members of an in-process group.
pub struct SharedGroup;

impl SharedGroup {
    /// One communicator per member; `ranks` name the members in errors. Hand each to its thread.
    pub fn members(ranks: Vec<Rank>, timeout: Duration) -> Vec<SharedCommunicator> {
        SharedGroup::build(ranks, timeout, None)
    }

    /// Like [`SharedGroup::members`], and once `health` records a failure every pending and later
    /// call of the group ends with [`Error::PeerFailed`] naming it, instead of at the timeout.
    pub fn watched(
        ranks: Vec<Rank>,
        timeout: Duration,
        health: &Health,
    ) -> Vec<SharedCommunicator> {
        SharedGroup::build(ranks, timeout, Some(health))
    }

    fn build(
        ranks: Vec<Rank>,
        timeout: Duration,
        health: Option<&Health>,
    ) -> Vec<SharedCommunicator> {
        let size = ranks.len();
        let slot = || (0..size).map(|_| Mutex::new(None)).collect::<Vec<_>>();
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: [slot(), slot()],
            outputs: [Mutex::new(Output::Empty), Mutex::new(Output::Empty)],
            ranks: ranks.clone(),
            timeout,
        });
        let points = InProcessTransport::world(size, 4, timeout);
        if let (Some(health), Some(point)) = (health, points.first()) {
            point.watch(health);
            health.on_failure_of(&shared, |group, failure| group.barrier.fail(failure));
        }
        points
            .into_iter()
            .enumerate()
            .map(|(index, transport)| SharedCommunicator {
                shared: shared.clone(),
                index,
                sequence: 0,
                point: TransportCommunicator::world(Arc::new(transport)).unwrap_or_else(|_| {
                    unreachable!("an in-process world always contains its own rank")
                }),
            })
            .collect()
    }
}

/// One device thread's handle on a [`SharedGroup`].
pub struct SharedCommunicator {
    shared: Arc<Shared>,
    index: usize,
    sequence: u64,
    point: TransportCommunicator,
}

struct Shared {
    ranks: Vec<Rank>,
    timeout: Duration,
    barrier: Barrier,
    /// Contributions, double-buffered by sequence parity so a fast member can publish its next
    /// call while a slow one still reads this one.
    slots: [Vec<Mutex<Option<Contribution>>>; 2],
    outputs: [Mutex<Output>; 2],
}

#[derive(Clone)]
struct Contribution {
    kind: MessageKind,
    sequence: u64,
    detail: (usize, Option<ReduceOp>),
    tensor: Option<Tensor>,
}

/// The shared output of one call.
enum Output {
    Empty,
    Writing { sequence: u64, storage: CpuStorage, pointer: OutputPointer, meta: TensorMeta },
    Done { sequence: u64, tensor: Tensor },
}

/// Where members write their disjoint parts of a [`Output::Writing`] buffer.
#[derive(Clone, Copy)]
struct OutputPointer {
    start: *mut u8,
    length: usize,
}

// SAFETY: the pointer targets the heap buffer of a `CpuStorage` owned by `Output::Writing`, which
// stays in place (never read, moved out or dropped) until every member has passed the barrier that
// ends the writes; members write disjoint ranges only.
unsafe impl Send for OutputPointer {}

impl OutputPointer {
    /// Runs `write` on this member's own `range` of the output.
    fn write<T>(self, range: Range<usize>, write: impl FnOnce(&mut [u8]) -> T) -> T {
        assert!(range.end <= self.length, "output range {range:?} beyond {} bytes", self.length);
        // SAFETY: see the `Send` impl: the buffer lives until the closing barrier, which this
        // member reaches only after `write` returned, and `range` is this member's own, disjoint
        // from every other member's.
        let target =
            unsafe { std::slice::from_raw_parts_mut(self.start.add(range.start), range.len()) };
        write(target)
    }
}

impl SharedCommunicator {
    fn size(&self) -> usize {
        self.shared.ranks.len()
    }

    /// Publishes this member's contribution, waits for all, and returns everyone's (checked).
    fn gather(
        &mut self,
        kind: MessageKind,
        detail: (usize, Option<ReduceOp>),
        tensor: Option<&Tensor>,
    ) -> Result<(u64, Vec<Contribution>)> {
        let sequence = self.sequence;
        self.sequence += 1;
        let parity = (sequence % 2) as usize;
        let mine = Contribution { kind, sequence, detail, tensor: tensor.cloned() };
        *lock(&self.shared.slots[parity][self.index]) = Some(mine);
        self.shared.barrier.wait(self.index, &self.shared, kind, sequence)?;
        let contributions: Vec<Contribution> = self.shared.slots[parity]
            .iter()
            .map(|slot| lock(slot).clone())
            .collect::<Option<Vec<_>>>()
            .ok_or(Error::InvalidArgument {
                collective: kind.name(),
                reason: "a member published nothing".into(),
            })?;
        for (member, other) in contributions.iter().enumerate() {
            if other.kind != kind || other.sequence != sequence || other.detail != detail {
                return Err(Error::SequenceMismatch {
                    collective: kind.name(),
                    peer: self.shared.ranks[member],
                    expected: sequence,
                    received_collective: format!("{} {:?}", other.kind.name(), other.detail),
                    received: other.sequence,
                });
            }
        }
        Ok((sequence, contributions))
    }

    /// Inputs of every member, checked to share the dtype and element count of `like`.
    fn same_inputs(
        &self,
        kind: MessageKind,
        like: &Tensor,
        contributions: Vec<Contribution>,
    ) -> Result<Vec<Tensor>> {
        contributions
            .into_iter()
            .enumerate()
            .map(|(member, contribution)| {
                let tensor = contribution.tensor.unwrap_or_else(|| like.clone());
                if tensor.dtype() != like.dtype() || tensor.numel() != like.numel() {
                    let peer = self.shared.ranks[member];
                    return Err(mismatch(
                        kind.name(),
                        peer,
                        like.dtype(),
                        &format!("{:?}", like.dims()),
                        &tensor,
                    ));
                }
                Ok(tensor)
            })
            .collect()
    }

    /// The shared output buffer of call `sequence`, provided by the first member to ask: the
    /// buffer of call `sequence - 2` when nobody holds that result any more, else a new one.
    fn output(&self, sequence: u64, meta: &TensorMeta) -> OutputPointer {
        let mut output = lock(&self.shared.outputs[(sequence % 2) as usize]);
        if let Output::Writing { sequence: current, pointer, .. } = &*output {
            if *current == sequence {
                return *pointer;
            }
        }
        let previous = std::mem::replace(&mut *output, Output::Empty);
        let mut storage = reclaim(previous, meta.bytes());
        let bytes = storage.bytes_mut();
        let pointer = OutputPointer { start: bytes.as_mut_ptr(), length: bytes.len() };
        *output = Output::Writing { sequence, storage, pointer, meta: meta.clone() };
        pointer
    }

    /// Ends the writes of call `sequence` and returns the shared output.
    fn finish(&self, kind: MessageKind, sequence: u64) -> Result<Tensor> {
        self.shared.barrier.wait(self.index, &self.shared, kind, sequence)?;
        let mut output = lock(&self.shared.outputs[(sequence % 2) as usize]);
        match std::mem::replace(&mut *output, Output::Empty) {
            Output::Writing { sequence: current, storage, meta, .. } if current == sequence => {
                let tensor = Tensor::from_storage(meta, Arc::new(Storage::Cpu(storage)))?;
                *output = Output::Done { sequence, tensor: tensor.clone() };
                Ok(tensor)
            }
            Output::Done { sequence: current, tensor } if current == sequence => {
                *output = Output::Done { sequence, tensor: tensor.clone() };
                Ok(tensor)
            }
            _ => {
                unreachable!("the output of call {sequence} is written before its closing barrier")
            }
        }
    }

    /// Reduces chunk `index` of all inputs into the shared output; returns the whole result.
    fn cooperative_reduce(
        &mut self,
        kind: MessageKind,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Tensor> {
        check_reducible(kind.name(), tensor.dtype(), operation)?;
        let (sequence, contributions) = self.gather(kind, (root, Some(operation)), Some(tensor))?;
        let inputs = self.same_inputs(kind, tensor, contributions)?;
        let size = tensor.dtype().size();
        let elements = chunk(tensor.numel(), self.size(), self.index);
        let range = elements.start * size..elements.end * size;
        self.output(sequence, tensor.meta()).write(range.clone(), |target| {
            reduce_chunk(kind.name(), target, &inputs, range, tensor, operation)
        })?;
        self.finish(kind, sequence)
    }
}

impl Communicator for SharedCommunicator {
    fn group_index(&self) -> usize {
        self.index
    }

    fn group_size(&self) -> usize {
        self.size()
    }

    fn all_reduce(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        self.cooperative_reduce(MessageKind::AllReduce, tensor, operation, 0)
    }

    fn reduce_scatter(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        let kind = MessageKind::ReduceScatter;
        check_reducible(kind.name(), tensor.dtype(), operation)?;
        let (dim0, row) = rows(kind.name(), tensor)?;
        let (_, contributions) = self.gather(kind, (0, Some(operation)), Some(tensor))?;
        let inputs = self.same_inputs(kind, tensor, contributions)?;
        let own = chunk(dim0, self.size(), self.index);
        let mut output = slice_rows(kind.name(), &inputs[0], own.clone())?;
        let size = tensor.dtype().size();
        let range = own.start * row * size..own.end * row * size;
        let mut target = CpuStorage::zeroed(range.len());
        reduce_chunk(kind.name(), target.bytes_mut(), &inputs, range, tensor, operation)?;
        output = Tensor::from_storage(output.meta().clone(), Arc::new(Storage::Cpu(target)))?;
        Ok(output)
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let kind = MessageKind::AllGather;
        rows(kind.name(), tensor)?;
        let (sequence, contributions) = self.gather(kind, (0, None), Some(tensor))?;
        let parts: Vec<(Rank, Tensor)> = self
            .shared
            .ranks
            .iter()
            .zip(contributions)
            .map(|(&rank, contribution)| {
                (rank, contribution.tensor.unwrap_or_else(|| tensor.clone()))
            })
            .collect();
        // Every member checks every part, then copies only its own into the shared output.
        let (meta, offset) = gathered_meta(kind, tensor, &parts, self.index)?;
        let bytes = tensor.bytes()?;
        let range = offset..offset + bytes.len();
        self.output(sequence, &meta).write(range, |target| target.copy_from_slice(bytes));
        self.finish(kind, sequence)
    }

    fn all_to_all(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let kind = MessageKind::AllToAll;
        rows(kind.name(), tensor)?;
        let (_, contributions) = self.gather(kind, (0, None), Some(tensor))?;
        let n = self.size();
        let parts = self
            .shared
            .ranks
            .iter()
            .zip(contributions)
            .map(|(&rank, contribution)| {
                let input = contribution.tensor.unwrap_or_else(|| tensor.clone());
                let (dim0, _) = rows(kind.name(), &input)?;
                Ok((rank, slice_rows(kind.name(), &input, chunk(dim0, n, self.index))?))
            })
            .collect::<Result<Vec<_>>>()?;
        concat_rows(kind.name(), tensor, &parts)
    }

    fn broadcast(&mut self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let kind = MessageKind::Broadcast;
        check_root(kind.name(), root, self.size())?;
        if self.index == root && tensor.is_none() {
            return Err(Error::InvalidArgument {
                collective: kind.name(),
                reason: format!("member {root} is the root and must pass the tensor"),
            });
        }
        let tensor = if self.index == root { tensor } else { None };
        let (_, contributions) = self.gather(kind, (root, None), tensor)?;
        contributions[root].tensor.clone().ok_or(Error::InvalidArgument {
            collective: kind.name(),
            reason: "the root published no tensor".into(),
        })
    }

    fn reduce(
        &mut self,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        check_root(MessageKind::Reduce.name(), root, self.size())?;
        let result = self.cooperative_reduce(MessageKind::Reduce, tensor, operation, root)?;
        Ok((self.index == root).then_some(result))
    }

    fn send(&mut self, tensor: &Tensor, to: usize) -> Result<()> {
        self.point.send(tensor, to)
    }

    fn recv(&mut self, from: usize) -> Result<Tensor> {
        self.point.recv(from)
    }
}

/// Bytes reduced at a time by [`reduce_chunk`]: small enough that the block of the output stays
/// in the L1 cache while every input streams through it once.
const REDUCE_BLOCK_BYTES: usize = 16 << 10;

/// `target = inputs[0][range] ⊕ inputs[1][range] ⊕ …`, in member order, block by block: each
/// block is reduced in a scratch buffer that stays in the L1 cache, then written to the target
/// (with non-temporal stores when the target is large: see [`store_block`]). Memory sees one read
/// of every input and one write of the target.
fn reduce_chunk(
    collective: &'static str,
    target: &mut [u8],
    inputs: &[Tensor],
    range: Range<usize>,
    like: &Tensor,
    operation: ReduceOp,
) -> Result<()> {
    let sources = inputs
        .iter()
        .map(|input| Ok(&input.bytes()?[range.clone()]))
        .collect::<Result<Vec<&[u8]>>>()?;
    let Some((first, others)) = sources.split_first() else { return Ok(()) };
    let streaming = target.len() >= STREAMING_BYTES;
    let mut scratch = vec![0u64; REDUCE_BLOCK_BYTES / 8];
    let scratch: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch);
    for (index, block) in target.chunks_mut(REDUCE_BLOCK_BYTES).enumerate() {
        let offset = index * REDUCE_BLOCK_BYTES;
        let span = offset..offset + block.len();
        let sum = &mut scratch[..block.len()];
        sum.copy_from_slice(&first[span.clone()]);
        for other in others {
            reduce_into(collective, sum, &other[span.clone()], like.dtype(), operation)?;
        }
        store_block(block, sum, streaming);
    }
    store_fence(streaming);
    Ok(())
}

/// Targets of at least this many bytes are written with non-temporal stores: the result is too
/// large to be read back from the cache soon, and skipping the read-for-ownership of every target
/// line saves a sixth of the memory traffic of a 4-member reduction.
const STREAMING_BYTES: usize = 4 << 20;

/// Copies `source` into `target`; with `streaming` on x86-64, the 16-byte-aligned body of the
/// target is written with non-temporal stores (SSE2, always present there).
fn store_block(target: &mut [u8], source: &[u8], streaming: bool) {
    #[cfg(target_arch = "x86_64")]
    if streaming {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = target.as_ptr().align_offset(16).min(target.len());
        let body = (target.len() - head) / 16 * 16;
        target[..head].copy_from_slice(&source[..head]);
        let (lines, tail) = target[head..].split_at_mut(body);
        for (line, from) in lines.chunks_exact_mut(16).zip(source[head..].chunks_exact(16)) {
            // SAFETY: `line` is 16 bytes, 16-byte aligned (after `head`) and writable; `from` is
            // 16 readable bytes (the unaligned load accepts any address).
            unsafe {
                let value = _mm_loadu_si128(from.as_ptr().cast::<__m128i>());
                _mm_stream_si128(line.as_mut_ptr().cast::<__m128i>(), value);
            }
        }
        tail.copy_from_slice(&source[head + body..]);
        return;
    }
    let _ = streaming;
    target.copy_from_slice(source);
}

/// Orders the non-temporal stores of [`store_block`] before the barrier that publishes them.
fn store_fence(streaming: bool) {
    #[cfg(target_arch = "x86_64")]
    if streaming {
        // SAFETY: SSE2 is part of x86-64; a store fence has no other effect.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    let _ = streaming;
}

/// The storage of a finished call's output when every member has dropped it and it has
/// `bytes` bytes (its stale contents are overwritten in full), else zeroed new storage.
fn reclaim(previous: Output, bytes: usize) -> CpuStorage {
    if let Output::Done { tensor, .. } = previous {
        let storage = tensor.storage().clone();
        drop(tensor);
        if let Ok(Storage::Cpu(cpu)) = Arc::try_unwrap(storage) {
            if cpu.len() == bytes {
                return cpu;
            }
        }
    }
    CpuStorage::zeroed(bytes)
}

/// The meta of the concatenation and the byte offset of member `index`'s part.
fn gathered_meta(
    kind: MessageKind,
    like: &Tensor,
    parts: &[(Rank, Tensor)],
    index: usize,
) -> Result<(TensorMeta, usize)> {
    let trailing = &like.dims()[1..];
    let mut total_rows = 0;
    let mut offset = 0;
    for (member, (peer, part)) in parts.iter().enumerate() {
        if part.dtype() != like.dtype() || part.dims().get(1..) != Some(trailing) {
            return Err(mismatch(
                kind.name(),
                *peer,
                like.dtype(),
                &format!("[_, {trailing:?}]"),
                part,
            ));
        }
        if member < index {
            offset += part.meta().bytes();
        }
        total_rows += part.dims()[0];
    }
    let mut dims = like.dims().to_vec();
    dims[0] = total_rows;
    Ok((TensorMeta::new(dims, like.dtype()), offset))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A reusable barrier whose waits time out and name the member that did not arrive.
struct Barrier {
    state: Mutex<BarrierState>,
    changed: Condvar,
    /// `state.generation`, readable without the lock by members that spin before sleeping.
    generation: AtomicU64,
}

/// How long a member yields its core while waiting at the barrier before it sleeps on the
/// condition variable: device threads usually meet within microseconds, and a wake-up from
/// sleep costs more than that (measured: 1 MiB in-process all-reduce on 4 threads, 2 cores).
const SPIN: Duration = Duration::from_micros(50);

struct BarrierState {
    generation: u64,
    arrived: Vec<bool>,
    broken: Option<Error>,
}

impl Barrier {
    fn new(size: usize) -> Self {
        Barrier {
            state: Mutex::new(BarrierState {
                generation: 0,
                arrived: vec![false; size],
                broken: None,
            }),
            changed: Condvar::new(),
            generation: AtomicU64::new(0),
        }
    }

    /// Breaks the barrier for good: every member waiting now or later gets the failure.
    fn fail(&self, failure: &PeerFailure) {
        let mut state = lock(&self.state);
        if state.broken.is_none() {
            state.broken = Some(Error::PeerFailed {
                peer: Rank(failure.rank),
                operation: "barrier".into(),
                reason: failure.reason.clone(),
            });
        }
        // Spinning members look at the generation only: they sleep on `changed` next.
        self.changed.notify_all();
    }

    fn wait(&self, member: usize, shared: &Shared, kind: MessageKind, sequence: u64) -> Result<()> {
        let mut state = lock(&self.state);
        if let Some(error) = &state.broken {
            return Err(copy_error(error));
        }
        let generation = state.generation;
        state.arrived[member] = true;
        if state.arrived.iter().all(|&arrived| arrived) {
            state.arrived.iter_mut().for_each(|arrived| *arrived = false);
            state.generation += 1;
            self.generation.store(state.generation, Ordering::Release);
            self.changed.notify_all();
            return Ok(());
        }
        drop(state);
        let started = Instant::now();
        while started.elapsed() < SPIN {
            if self.generation.load(Ordering::Acquire) != generation {
                return Ok(());
            }
            std::thread::yield_now();
        }
        let mut state = lock(&self.state);
        let deadline = started + shared.timeout;
        while state.generation == generation {
            if let Some(error) = &state.broken {
                return Err(copy_error(error));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = state.arrived.iter().position(|&arrived| !arrived).unwrap_or(member);
                let error = Error::Timeout {
                    peer: shared.ranks[missing],
                    operation: format!("{} #{sequence}", kind.name()),
                    timeout: shared.timeout,
                };
                state.broken = Some(copy_error(&error));
                self.changed.notify_all();
                return Err(error);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
        }
        Ok(())
    }
}

fn copy_error(error: &Error) -> Error {
    match error {
        Error::Timeout { peer, operation, timeout } => {
            Error::Timeout { peer: *peer, operation: operation.clone(), timeout: *timeout }
        }
        Error::PeerFailed { peer, operation, reason } => {
            Error::PeerFailed { peer: *peer, operation: operation.clone(), reason: reason.clone() }
        }
        other => Error::InvalidArgument {
            collective: "group",
            reason: format!("the group is broken: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_failure_ends_waits_at_once_and_names_the_failed_rank() {
        let health = Health::new();
        let mut members =
            SharedGroup::watched(vec![Rank(0), Rank(1)], Duration::from_secs(60), &health);
        let _absent = members.pop();
        let mut waiting = members.pop().expect("two members");
        let started = Instant::now();
        let failing = health.clone();
        let failer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            failing.fail(PeerFailure { rank: 1, reason: "act of embedding failed".into() });
        });
        let input = Tensor::from_slice(&[1.0f32; 8], [8]).expect("tensor");
        let error = waiting.all_reduce(&input, ReduceOp::Sum).expect_err("peer failed");
        failer.join().expect("failer");
        // Well inside the 60 s timeout: the failure, not the clock, ended the wait.
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
        match &error {
            Error::PeerFailed { peer, reason, .. } => {
                assert_eq!(*peer, Rank(1));
                assert!(reason.contains("embedding"), "{reason}");
            }
            other => panic!("expected PeerFailed, got {other}"),
        }
        // The group stays failed: a later call does not wait either.
        let later = waiting.all_reduce(&input, ReduceOp::Sum).expect_err("still failed");
        assert!(matches!(later, Error::PeerFailed { .. }), "{later}");
    }

    #[test]
    fn streaming_stores_copy_every_byte_at_any_alignment() {
        let source: Vec<u8> = (0..1000u32).map(|value| (value % 251) as u8).collect();
        for offset in 0..17 {
            for streaming in [false, true] {
                let mut target = vec![0u8; 1000 + 17];
                store_block(&mut target[offset..offset + 1000], &source, streaming);
                store_fence(streaming);
                assert_eq!(&target[offset..offset + 1000], &source[..], "offset {offset}");
                assert!(target[..offset].iter().all(|&byte| byte == 0), "offset {offset}");
            }
        }
    }
}
