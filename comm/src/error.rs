//! The one error type of meshflow-comm: every failure is a value that names the peer and the
//! collective involved; nothing read from the network panics.

use std::net::SocketAddr;
use std::time::Duration;

use meshflow_ops::DType;

use crate::Rank;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while moving bytes between ranks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- endpoint and connection setup ----
    /// The QUIC endpoint or its runtime could not be created.
    #[error("QUIC endpoint setup failed: {reason}")]
    Setup {
        /// What failed.
        reason: String,
    },
    /// Dialing a peer failed before authentication started.
    #[error("connecting to {address} failed: {reason}")]
    Connect {
        /// The address that was dialed.
        address: SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// A peer did not prove that it holds the job secret; its connection was closed.
    #[error("peer at {address} failed job authentication: {reason}")]
    Authentication {
        /// The remote address of the refused peer.
        address: SocketAddr,
        /// Why it was refused.
        reason: String,
    },
    /// The endpoint was closed while waiting for connections.
    #[error("the QUIC endpoint is closed")]
    EndpointClosed,

    // ---- peers and frames ----
    /// A peer closed its connection or stream (or died) during an operation.
    #[error("peer {peer} closed the connection during {operation}: {reason}")]
    PeerClosed {
        /// The peer.
        peer: Rank,
        /// The collective or transport operation in progress.
        operation: String,
        /// What the connection reported.
        reason: String,
    },
    /// The job's failure detection declared a rank failed (it exited, crashed or stopped
    /// answering): every pending and later operation of the job ends with this error.
    #[error("rank {peer} failed ({reason}); {operation} on this rank was abandoned")]
    PeerFailed {
        /// The failed rank.
        peer: Rank,
        /// The collective or transport operation that was abandoned.
        operation: String,
        /// How the failure was noticed (no heartbeat, exit status …).
        reason: String,
    },
    /// A blocking wait ran past its configured timeout.
    #[error("timed out after {timeout:?} during {operation} waiting for peer {peer}")]
    Timeout {
        /// The peer that did not answer.
        peer: Rank,
        /// The collective or transport operation in progress.
        operation: String,
        /// The configured limit.
        timeout: Duration,
    },
    /// A frame from a peer failed validation; nothing in it was used.
    #[error("invalid frame from peer {peer}: {reason}")]
    InvalidFrame {
        /// The peer that sent it.
        peer: Rank,
        /// What was wrong.
        reason: String,
    },
    /// A frame announced more bytes than the maximum frame size.
    #[error("frame of {length} bytes from peer {peer} exceeds the maximum frame size of {maximum} bytes")]
    FrameTooLarge {
        /// The peer that sent it (or that it was meant for).
        peer: Rank,
        /// Announced length.
        length: u64,
        /// The configured maximum.
        maximum: u64,
    },
    /// A rank outside the transport's world was named.
    #[error("rank {peer} is not connected (world size {world_size})")]
    UnknownPeer {
        /// The rank.
        peer: Rank,
        /// The transport's world size.
        world_size: usize,
    },

    // ---- collectives ----
    /// Ranks issued collectives in different orders (or different collectives at one step).
    #[error(
        "{collective} #{expected} on this rank met {received_collective} #{received} from peer {peer}: \
         collectives must be called in the same order on every rank"
    )]
    SequenceMismatch {
        /// The collective this rank is running.
        collective: &'static str,
        /// The peer whose message did not match.
        peer: Rank,
        /// This rank's sequence number.
        expected: u64,
        /// The collective the peer is running.
        received_collective: String,
        /// The peer's sequence number.
        received: u64,
    },
    /// A peer contributed a tensor whose size, shape or dtype does not fit the collective.
    #[error("{collective}: peer {peer} sent {received}, expected {expected}")]
    SizeMismatch {
        /// The collective.
        collective: &'static str,
        /// The peer.
        peer: Rank,
        /// What this rank expected.
        expected: String,
        /// What arrived.
        received: String,
    },
    /// The arguments of a collective are invalid on this rank.
    #[error("{collective}: {reason}")]
    InvalidArgument {
        /// The collective.
        collective: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The reduction is not defined for this dtype.
    #[error("{collective}: reduction {operation} is not supported for dtype {dtype}")]
    UnsupportedDType {
        /// The collective.
        collective: &'static str,
        /// The reduction.
        operation: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// Building or viewing a tensor failed.
    #[error(transparent)]
    Tensor(#[from] meshflow_ops::Error),

    // ---- NCCL ----
    /// The NCCL backend is not available (not compiled with `cuda`, or no library at run time).
    #[error("NCCL unavailable: {reason}")]
    NcclUnavailable {
        /// Why.
        reason: String,
    },
    /// An NCCL call failed.
    #[error("NCCL {operation} failed on rank {rank}: {reason}")]
    Nccl {
        /// The NCCL call.
        operation: &'static str,
        /// This rank.
        rank: Rank,
        /// NCCL's error.
        reason: String,
    },
}
