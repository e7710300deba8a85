//! [`QuicTransport`]: the [`Transport`] over one authenticated QUIC connection per peer pair.
//!
//! Each (peer, channel) pair uses one unidirectional stream per direction, opened lazily with an
//! 8-byte preamble (`MFST`, channel). Frames on it are [`crate::frame`]s. The receiver reads a
//! frame only when `recv` asks for it, so QUIC's stream flow control is the back-pressure: a sender
//! can be at most one stream window ahead of the receiver.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use meshflow_ops::buffers::BufferPool;
use meshflow_ops::{CpuStorage, Storage, Tensor, TensorMeta};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::Notify;

use super::timings::OperationLog;
use super::{AuthenticatedConnection, QuicEndpoint};
use crate::transport::{Arrived, Delivery};
use crate::{frame, Channel, Error, Message, Piece, Rank, Result, Transport};

const STREAM_MAGIC: &[u8; 4] = b"MFST";

/// Tensor messages over QUIC between the processes of one job.
pub struct QuicTransport {
    endpoint: QuicEndpoint,
    world_size: usize,
    links: Vec<Option<Arc<PeerLink>>>,
    /// Storage of received payloads: a message dropped by its reader gives its buffer back for
    /// the next one, so a receive neither zero-fills nor page-faults fresh memory.
    buffers: Arc<BufferPool>,
    /// Timestamps of the blocking operations, when [`super::TIMES_VARIABLE`] is set.
    log: Option<OperationLog>,
}

struct PeerLink {
    peer: Rank,
    connection: Connection,
    outgoing: Mutex<HashMap<Channel, Arc<tokio::sync::Mutex<Option<SendStream>>>>>,
    incoming: Mutex<HashMap<Channel, RecvStream>>,
    arrived: Notify,
}

type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

impl QuicTransport {
    /// Connects a full mesh: dials every lower rank at `addresses[rank]` and accepts every higher
    /// one. Strangers that fail authentication are refused and ignored.
    pub fn connect_mesh(endpoint: QuicEndpoint, addresses: &[SocketAddr]) -> Result<Self> {
        let me = endpoint.rank().0;
        let world_size = addresses.len();
        let dial = async {
            let mut connections = Vec::new();
            for (rank, &address) in addresses.iter().enumerate().take(me) {
                let connection = endpoint.connect(address).await?;
                if connection.peer_rank() != Rank(rank) {
                    connection.close(1, "unexpected rank");
                    let reason = format!(
                        "expected rank {rank}, the peer proved rank {}",
                        connection.peer_rank()
                    );
                    return Err(Error::Connect { address, reason });
                }
                connections.push(connection);
            }
            Ok(connections)
        };
        let accept = accept_ranks(&endpoint, me + 1..world_size);
        let (mut dialed, accepted) = endpoint.block_on(async {
            let deadline = endpoint.config().operation_timeout;
            let both = async { tokio::try_join!(dial, accept) };
            tokio::time::timeout(deadline, both).await.map_err(|_| Error::Timeout {
                peer: Rank(me),
                operation: "connect_mesh".into(),
                timeout: deadline,
            })?
        })?;
        dialed.extend(accepted);
        Self::from_connections(endpoint, world_size, dialed)
    }

    /// A transport over connections the caller already authenticated (one per peer).
    pub fn from_connections(
        endpoint: QuicEndpoint,
        world_size: usize,
        connections: Vec<AuthenticatedConnection>,
    ) -> Result<Self> {
        let mut links: Vec<Option<Arc<PeerLink>>> = (0..world_size).map(|_| None).collect();
        let runtime = endpoint.runtime();
        for connection in connections {
            let peer = connection.peer_rank();
            let slot = links.get_mut(peer.0).ok_or(Error::UnknownPeer { peer, world_size })?;
            let link = Arc::new(PeerLink {
                peer,
                connection: connection.connection().clone(),
                outgoing: Mutex::new(HashMap::new()),
                incoming: Mutex::new(HashMap::new()),
                arrived: Notify::new(),
            });
            runtime.spawn(accept_streams(link.clone(), endpoint.config().operation_timeout));
            *slot = Some(link);
        }
        let buffers = Arc::new(BufferPool::new(endpoint.config().receive_pool_bytes));
        let log = OperationLog::from_environment(endpoint.rank());
        Ok(QuicTransport { endpoint, world_size, links, buffers, log })
    }

    /// The endpoint underneath.
    pub fn endpoint(&self) -> &QuicEndpoint {
        &self.endpoint
    }

    /// quinn's statistics of the connection to `peer` (packets, losses, path MTU, congestion).
    pub fn stats(&self, peer: Rank) -> Result<quinn::ConnectionStats> {
        Ok(self.link(peer)?.connection.stats())
    }

    fn link(&self, peer: Rank) -> Result<&Arc<PeerLink>> {
        self.links
            .get(peer.0)
            .and_then(Option::as_ref)
            .ok_or(Error::UnknownPeer { peer, world_size: self.world_size })
    }

    fn bounded<'a, T: Send + 'a>(
        &self,
        peer: Rank,
        operation: &'a str,
        work: BoxedFuture<'a, T>,
    ) -> BoxedFuture<'a, T> {
        let timeout = self.timeout();
        Box::pin(async move {
            tokio::time::timeout(timeout, work).await.map_err(|_| Error::Timeout {
                peer,
                operation: operation.to_string(),
                timeout,
            })?
        })
    }

    fn transmit<'a>(&'a self, channel: Channel, piece: Piece) -> BoxedFuture<'a, ()> {
        let peer = piece.peer;
        let work: BoxedFuture<'a, ()> = Box::pin(async move {
            let link = self.link(peer)?;
            let max = self.endpoint.config().max_frame_bytes;
            write_piece(link, channel, piece, max).await
        });
        self.bounded(peer, "send", work)
    }

    fn receive<'a>(&'a self, peer: Rank, channel: Channel) -> BoxedFuture<'a, Message> {
        let work: BoxedFuture<'a, Message> = Box::pin(async move {
            let link = self.link(peer)?;
            let mut stream = take_stream(link, channel).await?;
            let max = self.endpoint.config().max_frame_bytes;
            let message = read_message(link.peer, &mut stream, max, &self.buffers).await?;
            link.incoming
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .insert(channel, stream);
            link.arrived.notify_waiters();
            Ok(message)
        });
        self.bounded(peer, "recv", work)
    }
}

impl Drop for QuicTransport {
    /// Finishes every outgoing stream and waits (bounded by the operation timeout, at most 5 s)
    /// until the peers acknowledged the data, so the last messages are not lost when the process
    /// exits right after sending them. Inside an async context it cannot wait and only finishes.
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.write();
        }
        let slots: Vec<_> = self
            .links
            .iter()
            .flatten()
            .flat_map(|link| lock(&link.outgoing).values().cloned().collect::<Vec<_>>())
            .collect();
        let flush = async move {
            for slot in slots {
                if let Some(stream) = slot.lock().await.as_mut() {
                    let _ = stream.finish();
                    let _ = stream.stopped().await;
                }
            }
        };
        let limit = self.timeout().min(Duration::from_secs(5));
        let bounded = async move {
            let _ = tokio::time::timeout(limit, flush).await;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            self.endpoint.block_on(bounded);
        } else {
            self.endpoint.runtime().spawn(bounded);
        }
    }
}

impl Transport for QuicTransport {
    fn rank(&self) -> Rank {
        self.endpoint.rank()
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn timeout(&self) -> Duration {
        self.endpoint.config().operation_timeout
    }

    fn send(&self, peer: Rank, channel: Channel, message: Message) -> Result<()> {
        OperationLog::timed(self.log.as_ref(), "send", || {
            self.endpoint.block_on(self.transmit(channel, whole(peer, message)))
        })
    }

    fn recv(&self, peer: Rank, channel: Channel) -> Result<Message> {
        OperationLog::timed(self.log.as_ref(), "recv", || {
            self.endpoint.block_on(self.receive(peer, channel))
        })
    }

    fn exchange(
        &self,
        channel: Channel,
        sends: Vec<(Rank, Message)>,
        receives: &[Rank],
    ) -> Result<Vec<Message>> {
        let sends: Vec<BoxedFuture<'_, ()>> = sends
            .into_iter()
            .map(|(peer, message)| self.transmit(channel, whole(peer, message)))
            .collect();
        let receives: Vec<BoxedFuture<'_, Message>> =
            receives.iter().map(|&peer| self.receive(peer, channel)).collect();
        OperationLog::timed(self.log.as_ref(), "exchange", || {
            self.endpoint.block_on(async {
                let (_, messages) = tokio::try_join!(join_all(sends), join_all(receives))?;
                Ok(messages)
            })
        })
    }

    /// Writes the pieces one after the other (each goes to quinn without a copy and is on its
    /// way while the next is written) and, at the same time, reads the receives in order, handing
    /// `arrived` each frame's header and then the payload as quinn's decrypted packets hold it
    /// (no copy of its own): quinn's tasks keep moving the data while the caller reduces what
    /// has arrived.
    fn stream_exchange(
        &self,
        sends: Vec<(Channel, Piece)>,
        receives: &[(Rank, Channel)],
        arrived: &mut Arrived<'_>,
    ) -> Result<()> {
        let sending = async {
            for (channel, piece) in sends {
                self.transmit(channel, piece).await?;
            }
            Ok(())
        };
        let receiving = async {
            for (index, &(peer, channel)) in receives.iter().enumerate() {
                self.deliver_frame(peer, channel, index, arrived).await?;
            }
            Ok(())
        };
        OperationLog::timed(self.log.as_ref(), "stream", || {
            self.endpoint.block_on(async { tokio::try_join!(sending, receiving).map(|_| ()) })
        })
    }
}

impl QuicTransport {
    /// Reads the next frame from `peer` on `channel` into `arrived` (see [`Delivery`]); every
    /// wait is bounded by the operation timeout.
    async fn deliver_frame(
        &self,
        peer: Rank,
        channel: Channel,
        index: usize,
        arrived: &mut Arrived<'_>,
    ) -> Result<()> {
        let link = self.link(peer)?;
        let timeout = self.timeout();
        let mut stream = within(peer, timeout, take_stream(link, channel)).await?;
        let max = self.endpoint.config().max_frame_bytes;
        let decoded = within(peer, timeout, read_header(peer, &mut stream, max)).await?;
        arrived(index, Delivery::Header { tag: decoded.tag, meta: &decoded.meta })?;
        let mut remaining = decoded.payload_bytes;
        while remaining > 0 {
            let read = async {
                stream
                    .read_chunk(remaining, true)
                    .await
                    .map_err(|error| closed(peer, "recv", error))
            };
            let Some(chunk) = within(peer, timeout, read).await? else {
                return Err(closed(peer, "recv", "the stream ended inside a frame"));
            };
            remaining = remaining.saturating_sub(chunk.bytes.len());
            arrived(index, Delivery::Payload(&chunk.bytes))?;
        }
        lock(&link.incoming).insert(channel, stream);
        link.arrived.notify_waiters();
        Ok(())
    }
}

/// `work`, or a timeout error naming `peer` once `timeout` has passed.
async fn within<T>(
    peer: Rank,
    timeout: Duration,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, work).await.map_err(|_| Error::Timeout {
        peer,
        operation: "recv".into(),
        timeout,
    })?
}

/// A whole message as a piece (its tensor is sent with its own shape).
fn whole(peer: Rank, message: Message) -> Piece {
    Piece::whole(peer, message.tag, message.tensor)
}

/// Accepts the peer's ids for `ranks` (each once); others and strangers are closed.
async fn accept_ranks(
    endpoint: &QuicEndpoint,
    ranks: std::ops::Range<usize>,
) -> Result<Vec<AuthenticatedConnection>> {
    let mut connections: Vec<AuthenticatedConnection> = Vec::new();
    while connections.len() < ranks.len() {
        let connection = match endpoint.accept().await {
            Ok(connection) => connection,
            Err(Error::Authentication { address, reason }) => {
                tracing::warn!(%address, %reason, "refused a peer");
                continue;
            }
            Err(error) => return Err(error),
        };
        let peer = connection.peer_rank();
        if !ranks.contains(&peer.0) || connections.iter().any(|known| known.peer_rank() == peer) {
            connection.close(1, "unexpected or duplicate rank");
            continue;
        }
        connections.push(connection);
    }
    Ok(connections)
}

/// Runs on the endpoint's runtime: files each new stream of the peer under its channel.
async fn accept_streams(link: Arc<PeerLink>, timeout: Duration) {
    while let Ok(mut stream) = link.connection.accept_uni().await {
        let mut preamble = [0u8; 8];
        let read = tokio::time::timeout(timeout, stream.read_exact(&mut preamble)).await;
        if !matches!(read, Ok(Ok(()))) || &preamble[..4] != STREAM_MAGIC {
            link.connection.close(quinn::VarInt::from_u32(2), b"invalid stream preamble");
            break;
        }
        let channel =
            Channel(u32::from_le_bytes([preamble[4], preamble[5], preamble[6], preamble[7]]));
        lock(&link.incoming).insert(channel, stream);
        link.arrived.notify_waiters();
    }
    link.arrived.notify_waiters();
}

async fn take_stream(link: &PeerLink, channel: Channel) -> Result<RecvStream> {
    loop {
        let notified = link.arrived.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(stream) = lock(&link.incoming).remove(&channel) {
            return Ok(stream);
        }
        if let Some(reason) = link.connection.close_reason() {
            return Err(closed(link.peer, "recv", reason));
        }
        notified.await;
    }
}

async fn write_piece(
    link: &PeerLink,
    channel: Channel,
    piece: Piece,
    max_frame_bytes: u64,
) -> Result<()> {
    let range = piece.byte_range();
    let whole = range.len() == piece.tensor.meta().bytes();
    let meta = if whole {
        piece.tensor.meta().clone()
    } else {
        TensorMeta::new([piece.elements.len()], piece.tensor.dtype())
    };
    if piece.tensor.bytes()?.get(range.clone()).is_none() {
        return Err(Error::InvalidArgument {
            collective: piece.tag.kind.name(),
            reason: format!(
                "elements {:?} outside a tensor of {}",
                piece.elements,
                piece.tensor.numel()
            ),
        });
    }
    let header = frame::encode_header(piece.tag, &meta)?;
    let length = (header.len() + range.len()) as u64;
    if length > max_frame_bytes {
        return Err(Error::FrameTooLarge { peer: link.peer, length, maximum: max_frame_bytes });
    }
    let slot = {
        let mut outgoing = lock(&link.outgoing);
        outgoing.entry(channel).or_default().clone()
    };
    let mut guard = slot.lock().await;
    let operation = piece.tag.kind.name();
    if guard.is_none() {
        let mut stream = link
            .connection
            .open_uni()
            .await
            .map_err(|error| closed(link.peer, operation, error))?;
        let preamble = [&STREAM_MAGIC[..], &channel.0.to_le_bytes()].concat();
        stream.write_all(&preamble).await.map_err(|error| closed(link.peer, operation, error))?;
        *guard = Some(stream);
    }
    let Some(stream) = guard.as_mut() else { unreachable!("the stream was opened above") };
    // The payload goes to quinn as a view of the tensor's own storage: no copy before encryption.
    let payload = Payload { tensor: piece.tensor, range };
    let mut chunks = [Bytes::from(header), Bytes::from_owner(payload)];
    stream.write_all_chunks(&mut chunks).await.map_err(|error| closed(link.peer, operation, error))
}

/// A range of a tensor's bytes, lent to quinn's send buffer (which keeps the storage alive until
/// acknowledged). The storage is shared, hence never written while the piece is in flight.
struct Payload {
    tensor: Tensor,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        // `write_piece` checked that the range lies inside the storage before building this.
        self.tensor.bytes().ok().and_then(|bytes| bytes.get(self.range.clone())).unwrap_or_default()
    }
}

/// Reads and validates the next frame's header; the payload follows on the stream.
async fn read_header(
    peer: Rank,
    stream: &mut RecvStream,
    max_frame_bytes: u64,
) -> Result<frame::Decoded> {
    let mut prefix = [0u8; frame::LENGTH_BYTES];
    stream.read_exact(&mut prefix).await.map_err(|error| closed(peer, "recv", error))?;
    let mut header = vec![0u8; frame::header_length(prefix, peer)?];
    stream.read_exact(&mut header).await.map_err(|error| closed(peer, "recv", error))?;
    frame::decode_header(&header, peer, max_frame_bytes)
}

async fn read_message(
    peer: Rank,
    stream: &mut RecvStream,
    max_frame_bytes: u64,
    buffers: &Arc<BufferPool>,
) -> Result<Message> {
    let decoded = read_header(peer, stream, max_frame_bytes).await?;
    // Stale bytes from the pool: `read_exact` overwrites every one, or the storage is dropped.
    let mut storage = CpuStorage::for_overwrite(decoded.payload_bytes, buffers);
    stream.read_exact(storage.bytes_mut()).await.map_err(|error| closed(peer, "recv", error))?;
    let tensor = Tensor::from_storage(decoded.meta, Arc::new(Storage::Cpu(storage)))?;
    Ok(Message { tag: decoded.tag, tensor })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn closed(peer: Rank, operation: &str, reason: impl std::fmt::Display) -> Error {
    Error::PeerClosed { peer, operation: operation.to_string(), reason: reason.to_string() }
}

/// Polls every future until all finish; the first error wins.
async fn join_all<T>(futures: Vec<BoxedFuture<'_, T>>) -> Result<Vec<T>> {
    let mut slots: Vec<Option<BoxedFuture<'_, T>>> = futures.into_iter().map(Some).collect();
    let mut results: Vec<Option<T>> = slots.iter().map(|_| None).collect();
    std::future::poll_fn(|context| {
        for (slot, result) in slots.iter_mut().zip(results.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(context) {
                    Poll::Ready(Ok(value)) => {
                        *result = Some(value);
                        *slot = None;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {}
                }
            }
        }
        if slots.iter().all(Option::is_none) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(results.into_iter().flatten().collect())
}
