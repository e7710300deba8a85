//! Rendezvous, a small key-value store and barrier, and peer failure detection.
//!
//! Rank 0 serves the rendezvous ([`Rendezvous`]); every rank (rank 0 too, over an in-process
//! link) joins it as a [`Member`] and learns the world: every rank's data address and device
//! count. The store (`set` / `get`, where `get` waits for the key) and named barriers are for
//! small out-of-band data such as an NCCL unique id.
//!
//! Transport: the rendezvous speaks over any [`Link`] — a pair of byte streams. In a job each link
//! is a stream of an authenticated QUIC connection (see the QUIC module of this crate), so a
//! process that cannot prove it holds the job secret never gets a link, and nothing it sends is
//! read. Frames are bounded and validated ([`wire`]).
//!
//! Failure detection: members and rendezvous exchange heartbeats every
//! [`ClusterConfig::heartbeat_interval`]. A member silent for [`ClusterConfig::failure_timeout`]
//! (it exited, crashed, or was stopped) is declared failed, and so is a member whose launcher
//! reports its exit; the rendezvous tells every member, whose [`Health`] then turns failed, so
//! that every pending and future `get`, `barrier` (and any collective that checks the health)
//! returns [`ClusterError::PeerFailed`] naming the rank. A member that hears nothing from the
//! rendezvous for the same time declares rank 0 failed. Detection is thus bounded by
//! `failure_timeout` plus one heartbeat interval.
//!
//! Comm operations obey the health through composition: [`WatchedTransport`] wraps any
//! transport and [`WatchedCommunicator`] any communicator, so that pending and later
//! collectives fail with `meshflow_comm::Error::PeerFailed` naming the rank as soon as the
//! health records the failure.

pub mod health;
mod member;
mod quic;
mod server;
mod watched;
pub mod wire;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use health::{Health, PeerFailure};
pub use member::{report_failure, Member};
pub use quic::{join_over_quic, report_over_quic, serve_over_quic, RENDEZVOUS_ACCEPTORS};
pub use server::Rendezvous;
pub use watched::{Abort, WatchedCommunicator, WatchedTransport};
pub use wire::MemberInfo;

/// The rank a launcher's endpoint announces when it reports a failed worker (not a worker rank).
pub const LAUNCHER_RANK: crate::Rank = crate::Rank(u32::MAX as usize);

/// Timing of the rendezvous and of failure detection.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// How long every rank has to join before the join fails naming the missing ranks.
    /// Default 300 s (nodes of a large job may start minutes apart).
    pub join_timeout: Duration,
    /// How often members and rendezvous send heartbeats. Default 1 s.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is declared failed. Default 5 s, so a failure is noticed
    /// within about 6 s.
    pub failure_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            join_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(1),
            failure_timeout: Duration::from_secs(5),
        }
    }
}

/// One bidirectional byte stream between a member and the rendezvous.
pub struct Link {
    /// Bytes from the other side.
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    /// Bytes to the other side.
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// Who the other side is (an address), for messages.
    pub peer: String,
    /// The rank the other side proved during authentication, if it did.
    pub proven_rank: Option<usize>,
    /// Whatever must live as long as the link (e.g. its QUIC connection).
    pub guard: Option<Box<dyn std::any::Any + Send>>,
}

impl Link {
    /// A link from any reader and writer.
    pub fn new(
        reader: impl AsyncRead + Unpin + Send + 'static,
        writer: impl AsyncWrite + Unpin + Send + 'static,
        peer: impl Into<String>,
    ) -> Self {
        Link {
            reader: Box::new(reader),
            writer: Box::new(writer),
            peer: peer.into(),
            proven_rank: None,
            guard: None,
        }
    }

    /// Two ends of an in-process link (rank 0's own membership, tests).
    pub fn pair() -> (Link, Link) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (near_reader, near_writer) = tokio::io::split(near);
        let (far_reader, far_writer) = tokio::io::split(far);
        (
            Link::new(near_reader, near_writer, "in-process"),
            Link::new(far_reader, far_writer, "in-process"),
        )
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Link").field("peer", &self.peer).finish()
    }
}

/// Errors of the rendezvous, the store and failure detection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A rank failed (exited, crashed, stopped answering); the job cannot go on.
    #[error("peer rank {rank} failed: {reason}")]
    PeerFailed {
        /// The rank.
        rank: usize,
        /// How it was noticed.
        reason: String,
    },
    /// Not every rank joined in time.
    #[error("rendezvous timed out after {waited:?}: ranks {missing:?} never arrived")]
    JoinTimedOut {
        /// Ranks that never joined.
        missing: Vec<usize>,
        /// How long the join waited.
        waited: Duration,
    },
    /// The rendezvous refused this rank.
    #[error("rendezvous refused rank {rank}: {reason}")]
    Refused {
        /// This rank.
        rank: usize,
        /// Why.
        reason: String,
    },
    /// The rendezvous could not be reached or the link broke.
    #[error("rendezvous at {peer}: {reason}")]
    Unreachable {
        /// The rendezvous address.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// A value or name exceeds the protocol bounds.
    #[error("{what} of {length} bytes exceeds the maximum of {maximum}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length.
        length: usize,
        /// The bound.
        maximum: usize,
    },
    /// This member already left the job.
    #[error("rank {rank} already left the job")]
    Left {
        /// This rank.
        rank: usize,
    },
}
