//! QUIC between processes and nodes: an authenticated endpoint and the bulk transport over it.
//!
//! # API summary
//!
//! - [`QuicConfig`]: typed settings with documented defaults tuned for bulk throughput (large
//!   windows, MTU discovery up to 64 KiB, GSO where it is safe, big socket buffers) and
//!   timeouts for every wait.
//! - [`JobSecret`]: the job's shared secret; `Debug`/`Display` print `JobSecret(<redacted>)`.
//!   [`JobSecret::generate`], [`JobSecret::expose_hex`] / [`JobSecret::from_hex`] pass it to workers.
//! - [`QuicEndpoint::bind`]`(address, rank, secret, config)`: one UDP socket that both listens and
//!   dials, with its own small tokio runtime ([`QuicEndpoint::runtime`], [`QuicEndpoint::block_on`]).
//!   - [`QuicEndpoint::connect`]`(address).await` and [`QuicEndpoint::accept`]`().await` return an
//!     [`AuthenticatedConnection`]; a peer without the secret is closed with [`auth::AUTH_FAILED`]
//!     and the call returns [`crate::Error::Authentication`].
//! - [`AuthenticatedConnection`]: [`peer_rank`](AuthenticatedConnection::peer_rank) (proved by
//!   the peer's MAC) and [`connection`](AuthenticatedConnection::connection), the quinn
//!   connection. The comm transport owns the *unidirectional* streams of a connection;
//!   *bidirectional* streams are free for the cluster layer (rendezvous, heartbeats).
//! - [`QuicTransport`]: the [`crate::Transport`] over one authenticated connection per peer pair;
//!   [`QuicTransport::connect_mesh`] dials lower ranks and accepts higher ones, or
//!   [`QuicTransport::from_connections`] adopts connections the cluster layer already holds.
//!
//! TLS 1.3 is always on (rustls with the ring provider, a fresh self-signed certificate per
//! endpoint). Certificates are not trusted for identity; authentication is bound to the TLS
//! session instead: see [`auth`].

pub mod auth;
mod config;
mod endpoint;
mod secret;
mod timings;
mod tls;
mod transport;
mod wait;

pub use config::{QuicConfig, WAIT_SPIN_VARIABLE};
pub use endpoint::{AuthenticatedConnection, QuicEndpoint};
pub use secret::{JobSecret, MIN_SECRET_BYTES};
pub use timings::TIMES_VARIABLE;
pub use transport::QuicTransport;
