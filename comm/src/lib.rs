//! Communication for meshflow: transports, wire frames, collectives.
//!
//! - [`quic`]: the authenticated QUIC endpoint (TLS always on, job secret bound to the session)
//!   and the QUIC [`Transport`] between processes and nodes.
//! - [`Transport`]: tagged tensor messages between ranks with back-pressure;
//!   [`InProcessTransport`] hands tensors between device threads without copying.
//! - [`frame`]: the validated wire format (rkyv header, raw payload).

pub mod error;
pub mod frame;
pub mod quic;
pub mod transport;

pub use error::{Error, Result};
pub use transport::{Channel, InProcessTransport, Message, MessageKind, Rank, Tag, Transport};
