//! [`QuicEndpoint`]: one UDP socket that listens and dials, and [`AuthenticatedConnection`].

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{ClientConfig, Connection, ServerConfig, TokioRuntime, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::{Handle, Runtime};

use super::{auth, tls, JobSecret, QuicConfig};
use crate::{Error, Rank, Result};

/// A QUIC endpoint of one process: listens on one UDP socket and dials peers from it.
///
/// It owns a small tokio runtime ([`QuicConfig::worker_threads`] workers) that drives quinn;
/// [`QuicEndpoint::runtime`] hands it out for the caller's own tasks. Every connection it
/// returns is authenticated: see [`super::auth`]. Cheap to clone.
#[derive(Clone)]
pub struct QuicEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Option<Runtime>,
    endpoint: quinn::Endpoint,
    client: ClientConfig,
    secret: JobSecret,
    config: QuicConfig,
    rank: Rank,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"endpoint dropped");
        if let Some(runtime) = self.runtime.take() {
            // Let the close reach the peers (they then fail fast instead of waiting for the idle
            // timeout); impossible, and skipped, when dropped inside an async context.
            if tokio::runtime::Handle::try_current().is_err() {
                let endpoint = self.endpoint.clone();
                runtime.block_on(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle())
                        .await;
                });
            }
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for QuicEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicEndpoint")
            .field("rank", &self.inner.rank)
            .field("local_address", &self.inner.endpoint.local_addr().ok())
            .field("secret", &self.inner.secret)
            .finish()
    }
}

impl QuicEndpoint {
    /// Binds a UDP socket at `address` (port 0 picks a free one) for the process of `rank`.
    pub fn bind(
        address: SocketAddr,
        rank: Rank,
        secret: JobSecret,
        config: QuicConfig,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads.max(1))
            .thread_name("meshflow-quic")
            .enable_all()
            .build()
            .map_err(|error| Error::Setup { reason: format!("tokio runtime: {error}") })?;
        let (socket, receive_buffer) = udp_socket(address, config.socket_buffer_bytes)?;
        let transport = config.transport(receive_buffer)?;
        let mut server = ServerConfig::with_crypto(Arc::new(tls::server_config()?));
        server.transport_config(transport.clone());
        let mut client = ClientConfig::new(Arc::new(tls::client_config()?));
        client.transport_config(transport);
        let endpoint_config = config.endpoint()?;
        let endpoint = {
            let _guard = runtime.enter();
            quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(TokioRuntime))
                .map_err(|error| Error::Setup {
                    reason: format!("QUIC endpoint at {address}: {error}"),
                })?
        };
        let inner = Inner { runtime: Some(runtime), endpoint, client, secret, config, rank };
        Ok(QuicEndpoint { inner: Arc::new(inner) })
    }

    /// The address peers dial to reach this endpoint.
    pub fn local_address(&self) -> Result<SocketAddr> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|error| Error::Setup { reason: format!("local address: {error}") })
    }

    /// The rank this endpoint announces to its peers.
    pub fn rank(&self) -> Rank {
        self.inner.rank
    }

    /// The settings it was built with.
    pub fn config(&self) -> &QuicConfig {
        &self.inner.config
    }

    /// The runtime that drives the endpoint; spawn stream handlers on it.
    pub fn runtime(&self) -> Handle {
        match &self.inner.runtime {
            Some(runtime) => runtime.handle().clone(),
            None => unreachable!("the runtime is only taken when the endpoint is dropped"),
        }
    }

    /// Runs a future on the endpoint's runtime from a thread outside it (a device thread),
    /// polling for up to [`QuicConfig::wait_spin`] after each pending poll before it sleeps.
    /// Must not be called from inside an async task.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        super::wait::wait(&self.runtime(), self.inner.config.wait_spin, future)
    }

    /// Dials `address` and authenticates; the peer's rank is what it proved.
    pub async fn connect(&self, address: SocketAddr) -> Result<AuthenticatedConnection> {
        let inner = &self.inner;
        let attempt = async {
            let connecting = inner
                .endpoint
                .connect_with(inner.client.clone(), address, "meshflow")
                .map_err(|error| Error::Connect { address, reason: error.to_string() })?;
            let connection = connecting
                .await
                .map_err(|error| Error::Connect { address, reason: error.to_string() })?;
            let peer = auth::dialer(&connection, &inner.secret, inner.rank).await?;
            Ok(AuthenticatedConnection { connection, peer })
        };
        tokio::time::timeout(inner.config.handshake_timeout, attempt)
            .await
            .map_err(|_| Error::Connect { address, reason: "handshake timed out".into() })?
    }

    /// Waits for the next incoming connection and authenticates it. A peer that fails
    /// authentication is closed and reported as [`Error::Authentication`]; call again to go on
    /// listening.
    pub async fn accept(&self) -> Result<AuthenticatedConnection> {
        let inner = &self.inner;
        let incoming = inner.endpoint.accept().await.ok_or(Error::EndpointClosed)?;
        let address = incoming.remote_address();
        let attempt = async {
            let connection = incoming
                .await
                .map_err(|error| Error::Authentication { address, reason: error.to_string() })?;
            let peer = auth::acceptor(&connection, &inner.secret, inner.rank).await?;
            Ok(AuthenticatedConnection { connection, peer })
        };
        tokio::time::timeout(inner.config.handshake_timeout, attempt)
            .await
            .map_err(|_| Error::Authentication { address, reason: "handshake timed out".into() })?
    }

    /// Closes every connection and stops listening.
    pub fn close(&self) {
        self.inner.endpoint.close(VarInt::from_u32(0), b"closed");
    }
}

/// A QUIC connection whose peer proved it holds the job secret.
///
/// The comm transport uses the connection's *unidirectional* streams; bidirectional streams are
/// free for the cluster layer (rendezvous, heartbeats): open them with
/// `connection().open_bi()` and accept them with `connection().accept_bi()`.
#[derive(Clone, Debug)]
pub struct AuthenticatedConnection {
    connection: Connection,
    peer: Rank,
}

impl AuthenticatedConnection {
    /// The rank the peer proved (it signed it together with the session keys).
    pub fn peer_rank(&self) -> Rank {
        self.peer
    }

    /// The underlying quinn connection, for opening and accepting streams.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Closes the connection with an application code and reason.
    pub fn close(&self, code: u32, reason: &str) {
        self.connection.close(VarInt::from_u32(code), reason.as_bytes());
    }
}

/// A bound UDP socket and the receive buffer the kernel granted it (bytes, as the kernel counts
/// them: twice the payload it holds).
fn udp_socket(address: SocketAddr, buffer_bytes: usize) -> Result<(UdpSocket, usize)> {
    let setup = |what: &str, error: std::io::Error| Error::Setup {
        reason: format!("UDP socket {what}: {error}"),
    };
    let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|error| setup("creation", error))?;
    // The kernel caps these at its configured maximum; a smaller buffer only costs throughput.
    if buffer_bytes > 0 {
        let _ = socket.set_recv_buffer_size(buffer_bytes);
        let _ = socket.set_send_buffer_size(buffer_bytes);
        force_buffers(&socket, buffer_bytes);
    }
    let granted = socket.recv_buffer_size().map_err(|error| setup("receive buffer", error))?;
    socket.bind(&address.into()).map_err(|error| setup("bind", error))?;
    Ok((socket.into(), granted))
}

/// Raises the socket's buffers to `bytes` past the kernel's cap (`net.core.rmem_max`,
/// `wmem_max`; 4 MiB on many systems) where the process may: `SO_RCVBUFFORCE` and
/// `SO_SNDBUFFORCE` need `CAP_NET_ADMIN`, as quic-go also tries. Elsewhere the calls fail with
/// `EPERM` and the capped buffers stay, with flow-control windows sized to them
/// ([`QuicConfig::windows_for`]).
#[cfg(target_os = "linux")]
fn force_buffers(socket: &Socket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: `socket` is an open descriptor for the duration of the call, and the option
        // value is a C int of the length passed; the kernel only reads it.
        let _ = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                length,
            )
        };
    }
}

/// Buffers cannot be raised past the kernel's cap on this platform.
#[cfg(not(target_os = "linux"))]
fn force_buffers(_socket: &Socket, _bytes: usize) {}
