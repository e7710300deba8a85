//! Point-to-point tensor messages between ranks, with back-pressure.
//!
//! A [`Transport`] moves [`Message`]s (a [`Tag`] and a [`Tensor`]) from one rank to another on a
//! [`Channel`]. Messages on one (sender, receiver, channel) arrive in order. A sender cannot run
//! ahead of the receiver's buffers: [`InProcessTransport`] holds at most `capacity` messages per
//! (sender, receiver, channel) and QUIC holds at most one stream window of bytes; beyond that
//! `send` waits, up to the configured timeout.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam::channel::{bounded, Receiver, Select, SelectedOperation, Sender};

use meshflow_ops::{Tensor, TensorMeta};

use crate::cluster::{Health, PeerFailure};
use crate::{Error, Result};

/// A process-wide (or, in one process, device-thread-wide) rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rank(pub usize);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Separates independent message streams between the same two ranks (one per group).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Channel(pub u32);

/// What a message belongs to: point-to-point traffic or one collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Point-to-point send/recv.
    Send,
    /// All-reduce.
    AllReduce,
    /// Reduce-scatter.
    ReduceScatter,
    /// All-gather.
    AllGather,
    /// All-to-all.
    AllToAll,
    /// Broadcast.
    Broadcast,
    /// Reduce to one root.
    Reduce,
}

impl MessageKind {
    const ALL: [MessageKind; 7] = [
        MessageKind::Send,
        MessageKind::AllReduce,
        MessageKind::ReduceScatter,
        MessageKind::AllGather,
        MessageKind::AllToAll,
        MessageKind::Broadcast,
        MessageKind::Reduce,
    ];

    /// The name used in errors (`all_reduce` …).
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Send => "send",
            MessageKind::AllReduce => "all_reduce",
            MessageKind::ReduceScatter => "reduce_scatter",
            MessageKind::AllGather => "all_gather",
            MessageKind::AllToAll => "all_to_all",
            MessageKind::Broadcast => "broadcast",
            MessageKind::Reduce => "reduce",
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|&kind| kind == self).unwrap_or(0) as u8
    }

    /// The kind of a wire code, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(code as usize).copied()
    }
}

/// Identifies one message: its kind, the call's sequence number on its group and the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    /// Collective (or send) it belongs to.
    pub kind: MessageKind,
    /// Sequence number of the call on its group.
    pub sequence: u64,
    /// Step inside the call.
    pub step: u32,
}

/// A tagged tensor in flight.
#[derive(Clone, Debug)]
pub struct Message {
    /// What it belongs to.
    pub tag: Tag,
    /// The data (shared storage: in-process hand-off copies nothing).
    pub tensor: Tensor,
}

/// Elements `elements` of a tensor, sent to `peer` as one message holding a 1-D tensor of the
/// same dtype. Transports that can send straight from the tensor's storage copy nothing.
#[derive(Clone, Debug)]
pub struct Piece {
    /// Where it goes.
    pub peer: Rank,
    /// What it belongs to.
    pub tag: Tag,
    /// The tensor whose elements are sent (shared storage, never modified while in flight).
    pub tensor: Tensor,
    /// The elements of `tensor`'s flat storage that are sent.
    pub elements: Range<usize>,
}

impl Piece {
    /// The whole of `tensor` as one piece.
    pub fn whole(peer: Rank, tag: Tag, tensor: Tensor) -> Self {
        let elements = 0..tensor.numel();
        Piece { peer, tag, tensor, elements }
    }

    /// The byte range of the piece in the tensor's storage.
    pub fn byte_range(&self) -> Range<usize> {
        let size = self.tensor.dtype().size();
        self.elements.start * size..self.elements.end * size
    }

    /// The piece as a message of its own: the tensor itself when the piece covers it (1-D), else
    /// a copy of the elements.
    pub fn to_message(&self) -> Result<Message> {
        let tensor = if self.elements == (0..self.tensor.numel()) && self.tensor.dims().len() == 1 {
            self.tensor.clone()
        } else {
            let bytes = self.tensor.bytes()?.get(self.byte_range()).ok_or_else(|| {
                Error::InvalidArgument {
                    collective: self.tag.kind.name(),
                    reason: format!(
                        "elements {:?} outside a tensor of {}",
                        self.elements,
                        self.tensor.numel()
                    ),
                }
            })?;
            Tensor::from_bytes(bytes, [self.elements.len()], self.tensor.dtype())?
        };
        Ok(Message { tag: self.tag, tensor })
    }
}

/// What a [`Transport::stream_exchange`] hands over of one received message: first its
/// [`Delivery::Header`], then its payload as [`Delivery::Payload`] slices in order (none for an
/// empty tensor). A transport may deliver the payload in any number of slices, each as soon as
/// it is in (QUIC hands over the decrypted packets themselves), so the receiver can reduce or
/// place the bytes without a copy of its own.
#[derive(Debug)]
pub enum Delivery<'a> {
    /// The message's tag and the shape and dtype of its tensor.
    Header {
        /// What it belongs to.
        tag: Tag,
        /// The shape and dtype; the payload holds `meta.bytes()` bytes.
        meta: &'a TensorMeta,
    },
    /// The next bytes of the payload.
    Payload(&'a [u8]),
}

/// Called with what a [`Transport::stream_exchange`] receives: the index of the receive in the
/// list of receives and the next part of its message (see [`Delivery`]).
pub type Arrived<'a> = dyn FnMut(usize, Delivery<'_>) -> Result<()> + 'a;

/// Hands a whole message to `arrived` as its header and one payload slice.
pub fn deliver(arrived: &mut Arrived<'_>, index: usize, message: &Message) -> Result<()> {
    arrived(index, Delivery::Header { tag: message.tag, meta: message.tensor.meta() })?;
    let bytes = message.tensor.bytes()?;
    if bytes.is_empty() {
        return Ok(());
    }
    arrived(index, Delivery::Payload(bytes))
}

/// Point-to-point messages between the ranks of one world.
pub trait Transport: Send + Sync {
    /// This side's rank.
    fn rank(&self) -> Rank;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The limit on every blocking wait.
    fn timeout(&self) -> Duration;
    /// Sends one message; waits (up to the timeout) while the receiver has no room for it.
    fn send(&self, peer: Rank, channel: Channel, message: Message) -> Result<()>;
    /// Receives the next message from `peer` on `channel`, waiting up to the timeout.
    fn recv(&self, peer: Rank, channel: Channel) -> Result<Message>;
    /// Sends `sends` and receives one message from each of `receives` (in that order), with
    /// sends and receives in flight together so two ranks exchanging large tensors cannot
    /// block each other. The default sends first, which is enough when a buffer holds a message.
    fn exchange(
        &self,
        channel: Channel,
        sends: Vec<(Rank, Message)>,
        receives: &[Rank],
    ) -> Result<Vec<Message>> {
        for (peer, message) in sends {
            self.send(peer, channel, message)?;
        }
        receives.iter().map(|&peer| self.recv(peer, channel)).collect()
    }

    /// Sends `sends` (each on its channel) in order and receives one message from each of
    /// `receives` (peer, channel) in order, handing each to `arrived` as it comes in (see
    /// [`Delivery`]) while the later sends and receives go on: the pipeline of a chunked ring
    /// step (reduce piece `k` while piece `k + 1` travels). The default sends from a scoped
    /// thread while this one receives, so neither side waits for the other whatever the buffers
    /// hold; the transports of this crate do both on the calling thread.
    fn stream_exchange(
        &self,
        sends: Vec<(Channel, Piece)>,
        receives: &[(Rank, Channel)],
        arrived: &mut Arrived<'_>,
    ) -> Result<()> {
        std::thread::scope(|scope| {
            let sending = scope.spawn(move || {
                sends.into_iter().try_for_each(|(channel, piece)| {
                    self.send(piece.peer, channel, piece.to_message()?)
                })
            });
            let received = receives.iter().enumerate().try_for_each(|(index, &(peer, channel))| {
                deliver(arrived, index, &self.recv(peer, channel)?)
            });
            let sent = sending.join().unwrap_or_else(|_| {
                Err(Error::InvalidArgument {
                    collective: "send",
                    reason: "the sending thread panicked".into(),
                })
            });
            received.and(sent)
        })
    }
}

type Mailbox = (Sender<Message>, Receiver<Message>);

/// The shared mailboxes of an in-process world.
struct Mailboxes {
    boxes: Mutex<HashMap<(Rank, Rank, Channel), Mailbox>>,
    capacity: usize,
    timeout: Duration,
    world_size: usize,
    /// Never carries a value: it disconnects (waking every wait that selects on it) when a
    /// watched [`Health`] records a failure, which `failure` then holds.
    tripped: Receiver<()>,
    trip: Mutex<Option<Sender<()>>>,
    failure: OnceLock<PeerFailure>,
}

impl Mailboxes {
    fn mailbox(&self, from: Rank, to: Rank, channel: Channel) -> Mailbox {
        let mut boxes = self.boxes.lock().unwrap_or_else(|poison| poison.into_inner());
        boxes.entry((from, to, channel)).or_insert_with(|| bounded(self.capacity)).clone()
    }
}

/// Transport between device threads of one process: a message is handed over by reference
/// (the tensor's storage is shared, never copied); at most `capacity` messages wait per
/// (sender, receiver, channel).
#[derive(Clone)]
pub struct InProcessTransport {
    mailboxes: Arc<Mailboxes>,
    rank: Rank,
}

impl InProcessTransport {
    /// One transport per rank of a world of `world_size` device threads.
    pub fn world(world_size: usize, capacity: usize, timeout: Duration) -> Vec<InProcessTransport> {
        let (trip, tripped) = bounded(0);
        let mailboxes = Arc::new(Mailboxes {
            boxes: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            timeout,
            world_size,
            tripped,
            trip: Mutex::new(Some(trip)),
            failure: OnceLock::new(),
        });
        (0..world_size)
            .map(|rank| InProcessTransport { mailboxes: mailboxes.clone(), rank: Rank(rank) })
            .collect()
    }

    /// Ends every pending and later send and receive of this transport's whole world with
    /// [`Error::PeerFailed`] once `health` records a failure, instead of at the timeout: a
    /// device thread that failed never sends what its peers wait for.
    pub fn watch(&self, health: &Health) {
        health.on_failure_of(&self.mailboxes, |mailboxes, failure| {
            let _ = mailboxes.failure.set(failure.clone());
            let mut trip = mailboxes.trip.lock().unwrap_or_else(|poison| poison.into_inner());
            drop(trip.take());
        });
    }

    fn check(&self, peer: Rank) -> Result<()> {
        if peer.0 >= self.mailboxes.world_size {
            return Err(Error::UnknownPeer { peer, world_size: self.mailboxes.world_size });
        }
        if self.mailboxes.failure.get().is_some() {
            return Err(self.failed(peer, "send or receive"));
        }
        Ok(())
    }

    /// The error of an operation with `peer` that the recorded failure ended.
    fn failed(&self, peer: Rank, operation: &str) -> Error {
        match self.mailboxes.failure.get() {
            Some(failure) => Error::PeerFailed {
                peer: Rank(failure.rank),
                operation: operation.to_string(),
                reason: failure.reason.clone(),
            },
            None => Error::PeerClosed {
                peer,
                operation: operation.to_string(),
                reason: "the world was aborted".into(),
            },
        }
    }

    /// Waits up to the timeout for one of the operations registered in `select`, or for the
    /// world's failure (registered here, last), which is then the error.
    fn wait<'a>(
        &'a self,
        select: &mut Select<'a>,
        peer: Rank,
        operation: &str,
    ) -> Result<SelectedOperation<'a>> {
        let tripped = select.recv(&self.mailboxes.tripped);
        let timed_out =
            |_| Error::Timeout { peer, operation: operation.to_string(), timeout: self.timeout() };
        let selected = select.select_timeout(self.timeout()).map_err(timed_out)?;
        if selected.index() == tripped {
            let _ = selected.recv(&self.mailboxes.tripped);
            return Err(self.failed(peer, operation));
        }
        Ok(selected)
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.mailboxes.world_size
    }

    fn timeout(&self) -> Duration {
        self.mailboxes.timeout
    }

    fn send(&self, peer: Rank, channel: Channel, message: Message) -> Result<()> {
        self.check(peer)?;
        let (sender, _) = self.mailboxes.mailbox(self.rank, peer, channel);
        let operation = message.tag.kind.name();
        let mut select = Select::new();
        select.send(&sender);
        let selected = self.wait(&mut select, peer, operation)?;
        selected.send(&sender, message).map_err(|_| Error::PeerClosed {
            peer,
            operation: operation.to_string(),
            reason: "mailbox closed".into(),
        })
    }

    fn recv(&self, peer: Rank, channel: Channel) -> Result<Message> {
        self.check(peer)?;
        let (_, receiver) = self.mailboxes.mailbox(peer, self.rank, channel);
        let mut select = Select::new();
        select.recv(&receiver);
        let selected = self.wait(&mut select, peer, "recv")?;
        selected.recv(&receiver).map_err(|_| Error::PeerClosed {
            peer,
            operation: "recv".into(),
            reason: "mailbox closed".into(),
        })
    }

    /// Sends and receives on this thread: each wait is on whichever comes first, room in the
    /// next send's mailbox or the next receive's message (no helper thread per exchange).
    fn stream_exchange(
        &self,
        sends: Vec<(Channel, Piece)>,
        receives: &[(Rank, Channel)],
        arrived: &mut Arrived<'_>,
    ) -> Result<()> {
        let mut sends = sends.into_iter();
        let (mut outgoing, mut message) = self.next_outgoing(&mut sends)?;
        let mut index = 0;
        while outgoing.is_some() || index < receives.len() {
            let incoming = match receives.get(index) {
                Some(&(peer, channel)) => {
                    self.check(peer)?;
                    Some((peer, self.mailboxes.mailbox(peer, self.rank, channel).1))
                }
                None => None,
            };
            let received = {
                let mut select = Select::new();
                let send = outgoing.as_ref().map(|(_, sender)| select.send(sender));
                if let Some((_, receiver)) = &incoming {
                    select.recv(receiver);
                }
                let peer = match (&outgoing, &incoming) {
                    (Some((peer, _)), _) | (None, Some((peer, _))) => *peer,
                    (None, None) => self.rank,
                };
                let operation = self.wait(&mut select, peer, "stream exchange")?;
                match (&outgoing, &incoming) {
                    (Some((peer, sender)), _) if Some(operation.index()) == send => {
                        let closed = |_| Error::PeerClosed {
                            peer: *peer,
                            operation: "send".into(),
                            reason: "mailbox closed".into(),
                        };
                        match message.take() {
                            Some(message) => operation.send(sender, message).map_err(closed)?,
                            None => unreachable!("a pending send always holds its message"),
                        }
                        None
                    }
                    (_, Some((peer, receiver))) => {
                        Some(operation.recv(receiver).map_err(|_| Error::PeerClosed {
                            peer: *peer,
                            operation: "recv".into(),
                            reason: "mailbox closed".into(),
                        })?)
                    }
                    _ => unreachable!("the selected operation is one of those registered"),
                }
            };
            match received {
                Some(arrival) => {
                    if let Err(error) = deliver(arrived, index, &arrival) {
                        self.flush(outgoing.zip(message), sends);
                        return Err(error);
                    }
                    index += 1;
                }
                None => (outgoing, message) = self.next_outgoing(&mut sends)?,
            }
        }
        Ok(())
    }
}

/// Where the next send of an in-process stream exchange goes: its peer and mailbox.
type Mailed = (Rank, Sender<Message>);

impl InProcessTransport {
    /// After a failed receive: hands the peers what still fits in their mailboxes, without
    /// waiting, so that a peer on a mismatched call names the mismatch instead of timing out.
    fn flush(
        &self,
        pending: Option<(Mailed, Message)>,
        sends: impl Iterator<Item = (Channel, Piece)>,
    ) {
        if let Some(((_, sender), message)) = pending {
            let _ = sender.try_send(message);
        }
        for (channel, piece) in sends {
            let (sender, _) = self.mailboxes.mailbox(self.rank, piece.peer, channel);
            if let Ok(message) = piece.to_message() {
                let _ = sender.try_send(message);
            }
        }
    }

    /// The next send of an in-process stream exchange: its peer and mailbox, and its message.
    fn next_outgoing(
        &self,
        sends: &mut impl Iterator<Item = (Channel, Piece)>,
    ) -> Result<(Option<Mailed>, Option<Message>)> {
        let Some((channel, piece)) = sends.next() else { return Ok((None, None)) };
        self.check(piece.peer)?;
        let (sender, _) = self.mailboxes.mailbox(self.rank, piece.peer, channel);
        Ok((Some((piece.peer, sender)), Some(piece.to_message()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(value: f32, sequence: u64) -> Message {
        let tensor = Tensor::from_slice(&[value; 4], [4]).expect("tensor");
        Message { tag: Tag { kind: MessageKind::Send, sequence, step: 0 }, tensor }
    }

    #[test]
    fn a_recorded_failure_ends_pending_receives_and_sends_of_the_world() {
        let health = Health::new();
        let world = InProcessTransport::world(2, 1, Duration::from_secs(60));
        world[1].watch(&health);
        let failing = health.clone();
        let failer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            failing.fail(PeerFailure { rank: 0, reason: "act failed".into() });
        });
        let started = std::time::Instant::now();
        let error = world[0].recv(Rank(1), Channel(0)).expect_err("peer failed");
        failer.join().expect("failer");
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
        assert!(matches!(&error, Error::PeerFailed { peer: Rank(0), .. }), "{error}");
        let error = world[1].send(Rank(0), Channel(0), message(1.0, 0)).expect_err("failed");
        assert!(matches!(&error, Error::PeerFailed { .. }), "{error}");
    }

    #[test]
    fn in_process_hand_off_shares_storage_and_keeps_order() {
        let world = InProcessTransport::world(2, 2, Duration::from_secs(5));
        let first = message(1.0, 0);
        let storage = first.tensor.storage().clone();
        world[0].send(Rank(1), Channel(0), first).expect("send");
        world[0].send(Rank(1), Channel(0), message(2.0, 1)).expect("send");
        let received = world[1].recv(Rank(0), Channel(0)).expect("recv");
        assert!(Arc::ptr_eq(received.tensor.storage(), &storage), "no copy in process");
        assert_eq!(received.tag.sequence, 0);
        assert_eq!(world[1].recv(Rank(0), Channel(0)).expect("recv").tag.sequence, 1);
    }

    #[test]
    fn pieces_travel_as_their_elements_and_arrive_in_order_without_deadlock() {
        // Capacity 1 and 50 pieces each way: the sends must go on while the receives run.
        let world = InProcessTransport::world(2, 1, Duration::from_secs(5));
        let tensor = Tensor::from_vec((0..100).map(|value| value as f32).collect(), [10, 10])
            .expect("tensor");
        let handles: Vec<_> = world
            .into_iter()
            .map(|transport| {
                let tensor = tensor.clone();
                std::thread::spawn(move || {
                    let peer = Rank(1 - transport.rank().0);
                    let sends = (0..50)
                        .map(|index| {
                            let tag =
                                Tag { kind: MessageKind::Send, sequence: index as u64, step: 0 };
                            let elements = 2 * index..2 * index + 2;
                            (Channel(9), Piece { peer, tag, tensor: tensor.clone(), elements })
                        })
                        .collect();
                    let mut arrived = Vec::new();
                    let mut headers = 0;
                    transport
                        .stream_exchange(sends, &[(peer, Channel(9)); 50], &mut |index, part| {
                            match part {
                                Delivery::Header { tag, meta } => {
                                    assert_eq!(tag.sequence, index as u64);
                                    assert_eq!(meta.shape.dims(), &[2]);
                                    headers += 1;
                                }
                                Delivery::Payload(bytes) => arrived
                                    .extend_from_slice(bytemuck::cast_slice::<u8, f32>(bytes)),
                            }
                            Ok(())
                        })
                        .expect("stream exchange");
                    assert_eq!(headers, 50);
                    arrived
                })
            })
            .collect();
        for handle in handles {
            let expected: Vec<f32> = (0..100).map(|value| value as f32).collect();
            assert_eq!(handle.join().expect("member"), expected);
        }
    }

    #[test]
    fn sender_cannot_run_ahead_of_the_receiver() {
        let world = InProcessTransport::world(2, 1, Duration::from_millis(50));
        world[0].send(Rank(1), Channel(3), message(1.0, 0)).expect("first fits");
        let error = world[0].send(Rank(1), Channel(3), message(1.0, 1)).expect_err("no credit");
        assert!(matches!(error, Error::Timeout { peer: Rank(1), .. }), "{error}");
        assert!(matches!(
            world[0].send(Rank(7), Channel(0), message(0.0, 0)),
            Err(Error::UnknownPeer { .. })
        ));
    }
}
