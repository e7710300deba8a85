//! Communication for meshflow: transports, wire frames, collectives.
//!
//! - [`quic`]: the authenticated QUIC endpoint (TLS always on, job secret bound to the session)
//!   and the QUIC [`Transport`] between processes and nodes.
//! - [`Transport`]: tagged tensor messages between ranks with back-pressure;
//!   [`InProcessTransport`] hands tensors between device threads without copying.
//! - [`nccl`]: NCCL communicators per GPU thread (feature `cuda`; typed error without it).
//! - [`frame`]: the validated wire format (rkyv header, raw payload).
//! - [`collective`]: all-reduce, reduce-scatter, all-gather, all-to-all, broadcast, reduce,
//!   send/recv on any group: [`SharedGroup`] (threads of one process, shared buffers) and
//!   [`TransportCommunicator`] (ring / direct over any transport).
//! - [`table`]: the nccl-tests-style benchmark tables (sizes, timing, rows) the comm bench and
//!   `meshflow bench comm` share.

pub mod cluster;
pub mod collective;
pub mod error;
pub mod frame;
pub mod nccl;
pub mod quic;
pub mod reduce;
pub mod table;
pub mod transport;

pub use collective::{
    mesh_axis_group, Communicator, SharedCommunicator, SharedGroup, TransportCommunicator,
};
pub use error::{Error, Result};
pub use reduce::{chunk, ReduceOp};
pub use transport::{
    deliver, Arrived, Channel, Delivery, InProcessTransport, Message, MessageKind, Piece, Rank,
    Tag, Transport,
};
