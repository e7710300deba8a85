//! [`TransportCommunicator`]: collectives over any [`Transport`] (ring and direct algorithms).

use std::ops::Range;
use std::sync::Arc;

use meshflow_ops::buffers::BufferPool;
use meshflow_ops::{CpuStorage, Shape, Storage, Tensor, TensorMeta};

use super::step::{GatherStep, ReduceStep, StepPlan};
use super::{check_root, concat_rows, mismatch, rows, slice_rows, Communicator};
use crate::reduce::{check_reducible, chunk, reduce_into};
use crate::{Channel, Error, Message, MessageKind, Piece, Rank, ReduceOp, Result, Tag, Transport};

/// All-reduces of at most this many bytes use the direct exchange (one round, latency-optimal);
/// larger ones use ring reduce-scatter + all-gather (bandwidth-optimal).
pub const DEFAULT_SMALL_MESSAGE_BYTES: usize = 64 << 10;

/// Ring steps travel in pieces of at most this many bytes, so that reducing one piece overlaps
/// the transfer of the next.
pub const DEFAULT_PIECE_BYTES: usize = 2 << 20;

/// Freed outputs and pieces a communicator keeps for reuse (no zero fill, no page faults).
const POOL_BYTES: usize = 256 << 20;

/// One member's handle on a group of ranks reached through a [`Transport`].
pub struct TransportCommunicator {
    transport: Arc<dyn Transport>,
    ranks: Vec<Rank>,
    index: usize,
    channel: Channel,
    point_channel: Channel,
    sequence: u64,
    sent: Vec<u64>,
    received: Vec<u64>,
    small_message_bytes: usize,
    piece_bytes: usize,
    buffers: Arc<BufferPool>,
}

/// One collective call: its kind and sequence number.
#[derive(Clone, Copy)]
pub(super) struct Call {
    pub kind: MessageKind,
    pub sequence: u64,
}

impl TransportCommunicator {
    /// A communicator over `ranks` (every member passes the same list, in the same order); the
    /// transport's own rank must be in it. Groups with different rank lists use different
    /// channels, so the groups of a mesh's axes do not interfere.
    pub fn new(transport: Arc<dyn Transport>, ranks: Vec<Rank>) -> Result<Self> {
        let me = transport.rank();
        let invalid = |reason: String| Error::InvalidArgument { collective: "group", reason };
        let index = ranks
            .iter()
            .position(|&rank| rank == me)
            .ok_or_else(|| invalid(format!("rank {me} is not in the group {ranks:?}")))?;
        let mut sorted = ranks.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != ranks.len() || sorted.iter().any(|rank| rank.0 >= transport.world_size())
        {
            return Err(invalid(format!("group {ranks:?} repeats ranks or leaves the world")));
        }
        let hash = group_hash(&ranks);
        Ok(TransportCommunicator {
            transport,
            index,
            channel: Channel(hash & 0x7fff_ffff),
            point_channel: Channel(hash | 0x8000_0000),
            sequence: 0,
            sent: vec![0; ranks.len()],
            received: vec![0; ranks.len()],
            ranks,
            small_message_bytes: DEFAULT_SMALL_MESSAGE_BYTES,
            piece_bytes: DEFAULT_PIECE_BYTES,
            buffers: Arc::new(BufferPool::new(POOL_BYTES)),
        })
    }

    /// A communicator over every rank of the transport's world.
    pub fn world(transport: Arc<dyn Transport>) -> Result<Self> {
        let ranks = (0..transport.world_size()).map(Rank).collect();
        Self::new(transport, ranks)
    }

    /// Changes the size up to which all-reduce uses the direct exchange.
    pub fn with_small_message_bytes(mut self, bytes: usize) -> Self {
        self.small_message_bytes = bytes;
        self
    }

    /// Changes the largest piece a ring step travels in (at least one element per piece).
    pub fn with_piece_bytes(mut self, bytes: usize) -> Self {
        self.piece_bytes = bytes.max(1);
        self
    }

    fn start(&mut self, kind: MessageKind) -> Call {
        let call = Call { kind, sequence: self.sequence };
        self.sequence += 1;
        call
    }

    fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Sends `sends` (member index, tensor) and receives one tensor from each of `receives`.
    fn exchange(
        &self,
        call: Call,
        step: u32,
        sends: Vec<(usize, Tensor)>,
        receives: &[usize],
    ) -> Result<Vec<Tensor>> {
        let tag = Tag { kind: call.kind, sequence: call.sequence, step };
        let messages = sends
            .into_iter()
            .map(|(member, tensor)| (self.ranks[member], Message { tag, tensor }))
            .collect();
        let peers: Vec<Rank> = receives.iter().map(|&member| self.ranks[member]).collect();
        let received = self
            .transport
            .exchange(self.channel, messages, &peers)
            .map_err(|error| rename(error, call))?;
        peers.iter().zip(received).map(|(&peer, message)| check(call, tag, peer, message)).collect()
    }

    /// The pieces one ring step's chunk travels in: as many as the largest chunk needs to keep
    /// pieces under [`TransportCommunicator::with_piece_bytes`], the same on every member.
    fn pieces_per_chunk(&self, chunks: &[Range<usize>], like: &Tensor) -> usize {
        let largest = chunks.iter().map(|range| range.len()).max().unwrap_or(0);
        (largest * like.dtype().size()).div_ceil(self.piece_bytes.max(1)).max(1)
    }

    /// Ring reduce-scatter over the element ranges `chunks`, pipelined: each ring step travels as
    /// pieces, and each piece is reduced with this member's input as its bytes arrive (while the
    /// next ones travel) into a buffer of its own, which the next step forwards as it is. The
    /// last step also writes this member's chunk of the reduction to `output`. Returns that
    /// chunk as its pieces in order.
    fn ring_reduce_scatter(
        &self,
        call: Call,
        tensor: &Tensor,
        chunks: &[Range<usize>],
        operation: ReduceOp,
        output: &mut [u8],
    ) -> Result<Vec<Tensor>> {
        let (n, i) = (self.size(), self.index);
        let (right, left) = (self.ranks[(i + 1) % n], self.ranks[(i + n - 1) % n]);
        let parts = self.pieces_per_chunk(chunks, tensor);
        let input = tensor.bytes()?;
        let mut carried: Vec<Tensor> = Vec::new();
        for step in 0..n - 1 {
            let outgoing = &chunks[(i + 2 * n - step - 1) % n];
            let incoming = chunks[(i + 2 * n - step - 2) % n].clone();
            let sends: Vec<(Channel, Piece)> = if step == 0 {
                (0..parts)
                    .map(|k| Piece {
                        peer: right,
                        tag: tag(call, step, parts, k),
                        tensor: tensor.clone(),
                        elements: sub_range(outgoing, parts, k),
                    })
                    .map(|piece| (self.channel, piece))
                    .collect()
            } else {
                self.forward(call, step, right, std::mem::take(&mut carried))
            };
            let plan =
                StepPlan { call, peer: left, step, parts, chunk: incoming, dtype: tensor.dtype() };
            let last = (step == n - 2).then_some(&mut *output);
            let mut receiver = ReduceStep::new(plan, input, operation, &self.buffers, last);
            self.transport
                .stream_exchange(sends, &vec![(left, self.channel); parts], &mut |k, delivery| {
                    receiver.deliver(k, delivery)
                })
                .map_err(|error| rename(error, call))?;
            carried = receiver.finish()?;
        }
        Ok(carried)
    }

    /// The pieces a ring step sends on, tagged as `step`.
    fn forward(
        &self,
        call: Call,
        step: usize,
        to: Rank,
        pieces: Vec<Tensor>,
    ) -> Vec<(Channel, Piece)> {
        let parts = pieces.len();
        pieces
            .into_iter()
            .enumerate()
            .map(|(k, piece)| (self.channel, Piece::whole(to, tag(call, step, parts, k), piece)))
            .collect()
    }

    /// Ring all-gather, pipelined like [`Self::ring_reduce_scatter`]: this member's chunk is
    /// already in `output` and travels as the pieces `own`; every other chunk lands in `output`
    /// (element ranges `chunks`) as its bytes arrive, and each piece received is forwarded as it
    /// is at the next step.
    fn ring_all_gather(
        &self,
        call: Call,
        like: &Tensor,
        output: &mut [u8],
        chunks: &[Range<usize>],
        own: Vec<Tensor>,
    ) -> Result<()> {
        let (n, i) = (self.size(), self.index);
        let (right, left) = (self.ranks[(i + 1) % n], self.ranks[(i + n - 1) % n]);
        let parts = self.pieces_per_chunk(chunks, like);
        let mut carried = own;
        for step in 0..n - 1 {
            let incoming = chunks[(i + 2 * n - step - 1) % n].clone();
            let ring_step = n - 1 + step;
            let sends = self.forward(call, ring_step, right, std::mem::take(&mut carried));
            let plan = StepPlan {
                call,
                peer: left,
                step: ring_step,
                parts,
                chunk: incoming,
                dtype: like.dtype(),
            };
            let forward = (step < n - 2).then_some(&self.buffers);
            let mut receiver = GatherStep::new(plan, output, forward);
            self.transport
                .stream_exchange(sends, &vec![(left, self.channel); parts], &mut |k, delivery| {
                    receiver.deliver(k, delivery)
                })
                .map_err(|error| rename(error, call))?;
            carried = receiver.finish()?;
        }
        Ok(())
    }

    /// Every member sends its whole tensor to every other; all reduce in member order, so every
    /// member computes bit-identical results.
    fn direct_all_reduce(
        &self,
        call: Call,
        tensor: &Tensor,
        operation: ReduceOp,
    ) -> Result<Tensor> {
        let others: Vec<usize> = (0..self.size()).filter(|&member| member != self.index).collect();
        let sends = others.iter().map(|&member| (member, tensor.clone())).collect();
        let mut received = self.exchange(call, 0, sends, &others)?.into_iter();
        let mut inputs = Vec::with_capacity(self.size());
        for member in 0..self.size() {
            let input = if member == self.index {
                tensor.clone()
            } else {
                received.next().unwrap_or_else(|| tensor.clone())
            };
            inputs.push((self.ranks[member], input));
        }
        reduce_in_order(call.kind.name(), tensor, &inputs, operation)
    }
}

impl Communicator for TransportCommunicator {
    fn group_index(&self) -> usize {
        self.index
    }

    fn group_size(&self) -> usize {
        self.size()
    }

    fn all_reduce(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        let call = self.start(MessageKind::AllReduce);
        check_reducible(call.kind.name(), tensor.dtype(), operation)?;
        let n = self.size();
        if n == 1 {
            return Ok(tensor.clone());
        }
        if tensor.meta().bytes() <= self.small_message_bytes || tensor.numel() < n {
            return self.direct_all_reduce(call, tensor, operation);
        }
        let chunks: Vec<_> = (0..n).map(|member| chunk(tensor.numel(), n, member)).collect();
        // Every byte is written: this member's chunk by the reduction, the others as they arrive.
        let mut output = CpuStorage::for_overwrite(tensor.meta().bytes(), &self.buffers);
        let size = tensor.dtype().size();
        let own = chunks[self.index].start * size..chunks[self.index].end * size;
        let reduced = self.ring_reduce_scatter(
            call,
            tensor,
            &chunks,
            operation,
            &mut output.bytes_mut()[own],
        )?;
        self.ring_all_gather(call, tensor, output.bytes_mut(), &chunks, reduced)?;
        Ok(Tensor::from_storage(tensor.meta().clone(), Arc::new(Storage::Cpu(output)))?)
    }

    fn reduce_scatter(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        let call = self.start(MessageKind::ReduceScatter);
        check_reducible(call.kind.name(), tensor.dtype(), operation)?;
        let (dim0, row) = rows(call.kind.name(), tensor)?;
        let n = self.size();
        let row_chunks: Vec<_> = (0..n).map(|member| chunk(dim0, n, member)).collect();
        if n == 1 {
            return Ok(tensor.clone());
        }
        let chunks: Vec<_> =
            row_chunks.iter().map(|rows| rows.start * row..rows.end * row).collect();
        let mut dims = tensor.dims().to_vec();
        dims[0] = row_chunks[self.index].len();
        let meta = TensorMeta::new(Shape::new(dims), tensor.dtype());
        let mut output = CpuStorage::for_overwrite(meta.bytes(), &self.buffers);
        self.ring_reduce_scatter(call, tensor, &chunks, operation, output.bytes_mut())?;
        Ok(Tensor::from_storage(meta, Arc::new(Storage::Cpu(output)))?)
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let call = self.start(MessageKind::AllGather);
        rows(call.kind.name(), tensor)?;
        let (n, i) = (self.size(), self.index);
        let mut pieces: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        pieces[i] = Some(tensor.clone());
        let (right, left) = ((i + 1) % n, (i + n - 1) % n);
        for step in 0..n - 1 {
            let outgoing = pieces[(i + n - step) % n].clone().unwrap_or_else(|| tensor.clone());
            let received = self.exchange(call, step as u32, vec![(right, outgoing)], &[left])?;
            pieces[(i + 2 * n - step - 1) % n] = received.into_iter().next();
        }
        let parts: Vec<(Rank, Tensor)> = pieces
            .into_iter()
            .enumerate()
            .map(|(member, piece)| (self.ranks[member], piece.unwrap_or_else(|| tensor.clone())))
            .collect();
        concat_rows(call.kind.name(), tensor, &parts)
    }

    fn all_to_all(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let call = self.start(MessageKind::AllToAll);
        let (dim0, _) = rows(call.kind.name(), tensor)?;
        let n = self.size();
        let mut pieces = (0..n)
            .map(|member| slice_rows(call.kind.name(), tensor, chunk(dim0, n, member)))
            .collect::<Result<Vec<_>>>()?;
        let others: Vec<usize> = (0..n).filter(|&member| member != self.index).collect();
        let sends = others.iter().map(|&member| (member, pieces[member].clone())).collect();
        let received = self.exchange(call, 0, sends, &others)?;
        for (&member, piece) in others.iter().zip(received) {
            pieces[member] = piece;
        }
        let parts: Vec<(Rank, Tensor)> = self.ranks.iter().copied().zip(pieces).collect();
        concat_rows(call.kind.name(), tensor, &parts)
    }

    fn broadcast(&mut self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let call = self.start(MessageKind::Broadcast);
        check_root(call.kind.name(), root, self.size())?;
        if self.index != root {
            let received = self.exchange(call, 0, Vec::new(), &[root])?;
            return received.into_iter().next().ok_or(Error::InvalidArgument {
                collective: call.kind.name(),
                reason: "no tensor arrived from the root".into(),
            });
        }
        let tensor = tensor.ok_or(Error::InvalidArgument {
            collective: call.kind.name(),
            reason: format!("member {root} is the root and must pass the tensor"),
        })?;
        let sends = (0..self.size())
            .filter(|&member| member != root)
            .map(|member| (member, tensor.clone()))
            .collect();
        self.exchange(call, 0, sends, &[])?;
        Ok(tensor.clone())
    }

    fn reduce(
        &mut self,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        let call = self.start(MessageKind::Reduce);
        check_root(call.kind.name(), root, self.size())?;
        check_reducible(call.kind.name(), tensor.dtype(), operation)?;
        if self.index != root {
            self.exchange(call, 0, vec![(root, tensor.clone())], &[])?;
            return Ok(None);
        }
        let others: Vec<usize> = (0..self.size()).filter(|&member| member != root).collect();
        let mut received = self.exchange(call, 0, Vec::new(), &others)?.into_iter();
        let mut inputs = Vec::with_capacity(self.size());
        for member in 0..self.size() {
            let input = if member == root {
                tensor.clone()
            } else {
                received.next().unwrap_or_else(|| tensor.clone())
            };
            inputs.push((self.ranks[member], input));
        }
        reduce_in_order(call.kind.name(), tensor, &inputs, operation).map(Some)
    }

    fn send(&mut self, tensor: &Tensor, to: usize) -> Result<()> {
        check_root("send", to, self.size())?;
        let tag = Tag { kind: MessageKind::Send, sequence: self.sent[to], step: 0 };
        self.sent[to] += 1;
        let message = Message { tag, tensor: tensor.clone() };
        self.transport.send(self.ranks[to], self.point_channel, message)
    }

    fn recv(&mut self, from: usize) -> Result<Tensor> {
        check_root("recv", from, self.size())?;
        let call = Call { kind: MessageKind::Send, sequence: self.received[from] };
        self.received[from] += 1;
        let peer = self.ranks[from];
        let message = self.transport.recv(peer, self.point_channel)?;
        check(
            call,
            Tag { kind: MessageKind::Send, sequence: call.sequence, step: 0 },
            peer,
            message,
        )
    }
}

/// FNV-1a over the rank list: the same group gives the same channel on every member.
fn group_hash(ranks: &[Rank]) -> u32 {
    ranks.iter().fold(0x811c_9dc5u32, |hash, rank| {
        (rank.0 as u32)
            .to_le_bytes()
            .iter()
            .fold(hash, |hash, &byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
    })
}

/// The tensor of a message, if its tag is the one this member expects.
fn check(call: Call, expected: Tag, peer: Rank, message: Message) -> Result<Tensor> {
    check_tag(call, expected, peer, message.tag)?;
    Ok(message.tensor)
}

/// Fails unless `received` is the tag this member expects.
pub(super) fn check_tag(call: Call, expected: Tag, peer: Rank, received: Tag) -> Result<()> {
    if received.kind != expected.kind || received.sequence != expected.sequence {
        return Err(Error::SequenceMismatch {
            collective: call.kind.name(),
            peer,
            expected: expected.sequence,
            received_collective: received.kind.name().to_string(),
            received: received.sequence,
        });
    }
    if received.step != expected.step {
        return Err(Error::InvalidFrame {
            peer,
            reason: format!(
                "{} step {} arrived during step {}",
                call.kind.name(),
                received.step,
                expected.step
            ),
        });
    }
    Ok(())
}

/// Names the collective in transport errors.
fn rename(error: Error, call: Call) -> Error {
    let operation = format!("{} #{}", call.kind.name(), call.sequence);
    match error {
        Error::Timeout { peer, timeout, .. } => Error::Timeout { peer, operation, timeout },
        Error::PeerClosed { peer, reason, .. } => Error::PeerClosed { peer, operation, reason },
        other => other,
    }
}

/// The tag of piece `k` (of `parts`) of ring step `step`.
pub(super) fn tag(call: Call, step: usize, parts: usize, k: usize) -> Tag {
    let step = u32::try_from(step * parts + k).unwrap_or(u32::MAX);
    Tag { kind: call.kind, sequence: call.sequence, step }
}

/// Piece `k` of `parts` balanced pieces of the element range `range`.
pub(super) fn sub_range(range: &Range<usize>, parts: usize, k: usize) -> Range<usize> {
    let piece = chunk(range.len(), parts, k);
    range.start + piece.start..range.start + piece.end
}

/// Reduces `inputs` in order into a tensor shaped like `like`.
fn reduce_in_order(
    collective: &'static str,
    like: &Tensor,
    inputs: &[(Rank, Tensor)],
    operation: ReduceOp,
) -> Result<Tensor> {
    let mut accumulator: Option<CpuStorage> = None;
    for (peer, input) in inputs {
        if input.dtype() != like.dtype() || input.numel() != like.numel() {
            return Err(mismatch(
                collective,
                *peer,
                like.dtype(),
                &format!("{:?}", like.dims()),
                input,
            ));
        }
        match accumulator.as_mut() {
            None => accumulator = Some(CpuStorage::from_bytes(input.bytes()?)),
            Some(storage) => reduce_into(
                collective,
                storage.bytes_mut(),
                input.bytes()?,
                like.dtype(),
                operation,
            )?,
        }
    }
    let storage = accumulator.unwrap_or_else(|| CpuStorage::from_bytes(&[]));
    Ok(Tensor::from_storage(like.meta().clone(), Arc::new(Storage::Cpu(storage)))?)
}
