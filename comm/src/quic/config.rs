//! [`QuicConfig`]: every knob of the QUIC endpoint, typed, with documented defaults.

use std::sync::Arc;
use std::time::Duration;

use quinn::{EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::{Error, Result};

/// Settings of a [`super::QuicEndpoint`] and the transport built on it.
///
/// The defaults are tuned for bulk tensor traffic: large flow-control windows so that one stream
/// can keep a fast link busy, MTU discovery up to the largest UDP payload (loopback and jumbo-frame
/// links reach it, ordinary Ethernet settles near 1500), segmentation offload where a batch of
/// datagrams fits one send, and large socket buffers so bursts are not dropped by the kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct QuicConfig {
    /// Limit on connecting plus authenticating one peer. Default 10 s.
    pub handshake_timeout: Duration,
    /// Limit on every blocking wait of the transport and the collectives (a send waiting for
    /// credit, a receive waiting for a frame). Default 60 s.
    pub operation_timeout: Duration,
    /// A connection with no traffic for this long is considered dead. Default 30 s.
    pub max_idle_timeout: Duration,
    /// Keep-alive packets are sent this often on idle connections. Default 5 s.
    pub keep_alive_interval: Duration,
    /// UDP payload size of the first packets. Default 1200 (safe on every path); MTU discovery
    /// raises it up to [`QuicConfig::max_mtu`]. (An initial MTU of 65 000 failed the handshake on
    /// loopback in our measurements: leave the climb to discovery.)
    pub initial_mtu: u16,
    /// Upper bound for path MTU discovery. Default 65 527, the largest UDP payload quinn sends.
    pub max_mtu: u16,
    /// Bytes one stream may have in flight unread by the receiver: the back-pressure bound of
    /// one channel. Default 16 MiB.
    pub stream_receive_window: u64,
    /// Bytes all streams of one connection may have in flight. Default 64 MiB.
    pub receive_window: u64,
    /// Bytes the sender buffers before waiting for acknowledgements. Default 64 MiB.
    pub send_window: u64,
    /// Use generic segmentation offload (one system call for several packets) where it is safe:
    /// see [`QuicConfig::segmentation_offload_in_effect`]. Default true, which with the default
    /// `max_mtu` leaves it off (64 KiB datagrams need no batching); a path configured with
    /// `max_mtu` 1452 (Ethernet) gets it.
    pub segmentation_offload: bool,
    /// Kernel send and receive buffer size requested for the UDP socket. Default 64 MiB. The
    /// kernel caps it at `net.core.rmem_max` / `wmem_max` unless the process holds
    /// `CAP_NET_ADMIN` (then it is forced); the windows shrink to fit what was granted
    /// ([`QuicConfig::windows_for`]). 0 keeps the system default.
    pub socket_buffer_bytes: usize,
    /// Largest frame (header plus payload) accepted from a peer. Default 2 GiB.
    pub max_frame_bytes: u64,
    /// Worker threads of the endpoint's async runtime. Default 2.
    pub worker_threads: usize,
    /// Bytes of freed receive buffers the transport keeps for reuse (a received tensor's
    /// storage returns to it when the tensor is dropped). Default 256 MiB.
    pub receive_pool_bytes: usize,
    /// How long a thread outside the runtime that waits for a transport operation (a device
    /// thread in a collective) polls before it sleeps: a sleeping thread's wake-up costs about
    /// as much as a small message's whole path on loopback. Default 100 µs, or
    /// [`WAIT_SPIN_VARIABLE`] (microseconds; 0 sleeps at once, as tokio's `block_on`).
    pub wait_spin: Duration,
}

/// The environment variable that replaces [`QuicConfig::wait_spin`]'s default (microseconds).
pub const WAIT_SPIN_VARIABLE: &str = "MESHFLOW_QUIC_WAIT_SPIN_US";

/// The default spin of a waiting thread: [`WAIT_SPIN_VARIABLE`] where set, else 100 µs. A value
/// that is not a whole number of microseconds is reported (a warning naming the variable and
/// the text) and the default is kept, so a typo does not pass for a setting.
fn default_wait_spin() -> Duration {
    const DEFAULT_MICROS: u64 = 100;
    let Ok(text) = std::env::var(WAIT_SPIN_VARIABLE) else {
        return Duration::from_micros(DEFAULT_MICROS);
    };
    let micros = text.trim().parse().unwrap_or_else(|_| {
        tracing::warn!(
            variable = WAIT_SPIN_VARIABLE,
            value = %text,
            "not a whole number of microseconds; the QUIC wait spins the default {DEFAULT_MICROS} µs"
        );
        DEFAULT_MICROS
    });
    Duration::from_micros(micros)
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            handshake_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(60),
            max_idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(5),
            initial_mtu: 1200,
            max_mtu: 65_527,
            stream_receive_window: 16 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            segmentation_offload: true,
            socket_buffer_bytes: 64 << 20,
            max_frame_bytes: 2 << 30,
            worker_threads: 2,
            receive_pool_bytes: 256 << 20,
            wait_spin: default_wait_spin(),
        }
    }
}

/// Linux refuses (`EMSGSIZE`) a segmentation-offload send whose datagrams add up to more than
/// one IP packet, 65 535 bytes.
const OFFLOAD_SEND_LIMIT_BYTES: usize = 65_535;
/// Datagrams quinn batches into one segmentation-offload send (its `MAX_TRANSMIT_SEGMENTS`).
const QUINN_OFFLOAD_SEGMENTS: usize = 10;

impl QuicConfig {
    /// Whether segmentation offload is really used: only when a full batch of quinn's (10
    /// datagrams of up to [`QuicConfig::max_mtu`] bytes) fits the kernel's 64 KiB limit on one
    /// offloaded send. Above it the kernel refuses every batch, quinn drops it silently
    /// (`EMSGSIZE` is what MTU probes get too), and the connection crawls through loss recovery
    /// and black-hole detection. Larger datagrams without offload cost as few system calls.
    pub fn segmentation_offload_in_effect(&self) -> bool {
        self.segmentation_offload
            && usize::from(self.max_mtu) * QUINN_OFFLOAD_SEGMENTS <= OFFLOAD_SEND_LIMIT_BYTES
    }

    /// The defaults with short timeouts, for tests that must end quickly when a peer dies.
    pub fn with_timeouts(mut self, operation: Duration) -> Self {
        self.operation_timeout = operation;
        self.handshake_timeout = operation;
        self.max_idle_timeout = operation;
        self.keep_alive_interval = operation / 4;
        self
    }

    /// quinn's endpoint settings: accept datagrams up to [`QuicConfig::max_mtu`] (quinn's own
    /// default, 1472, would drop the large packets MTU discovery probes with on loopback).
    pub(crate) fn endpoint(&self) -> Result<EndpointConfig> {
        let mut endpoint = EndpointConfig::default();
        endpoint.max_udp_payload_size(self.max_mtu.clamp(1200, 65_527)).map_err(|error| {
            Error::Setup { reason: format!("max UDP payload {}: {error}", self.max_mtu) }
        })?;
        Ok(endpoint)
    }

    /// The flow-control windows in effect on a socket whose receive buffer the kernel granted
    /// `receive_buffer` bytes (Linux reports twice the payload it holds): (stream, connection).
    ///
    /// A peer may have a whole window in flight. A window larger than the payload the socket
    /// can hold turns every burst that arrives while the reader is busy (both directions of an
    /// all-reduce, a loaded machine) into dropped datagrams, and the losses into collapsed
    /// congestion windows and retransmission timeouts: measured on loopback with the kernel's
    /// 4 MiB cap, 64 MiB windows ran at 0.03 GB/s where capped ones ran near TCP. So neither
    /// window exceeds half the granted buffer (never less than 1 MiB); where the kernel grants
    /// big buffers (`net.core.rmem_max`), the configured windows apply in full.
    pub fn windows_for(&self, receive_buffer: usize) -> (u64, u64) {
        let held = ((receive_buffer / 2) as u64).max(1 << 20);
        let connection = self.receive_window.min(held);
        (self.stream_receive_window.min(connection), connection)
    }

    /// quinn's transport settings for these values, on a socket with `receive_buffer` bytes of
    /// kernel receive buffer (see [`QuicConfig::windows_for`]).
    pub(crate) fn transport(&self, receive_buffer: usize) -> Result<Arc<TransportConfig>> {
        let (stream_window, connection_window) = self.windows_for(receive_buffer);
        let window = |bytes: u64| {
            VarInt::from_u64(bytes).map_err(|_| Error::Setup {
                reason: format!("window of {bytes} bytes is too large"),
            })
        };
        let idle = self.max_idle_timeout.try_into().map_err(|_| Error::Setup {
            reason: format!("idle timeout {:?} is too large", self.max_idle_timeout),
        })?;
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_mtu.max(self.initial_mtu));
        let mut transport = TransportConfig::default();
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive_interval))
            .initial_mtu(self.initial_mtu.max(1200))
            .mtu_discovery_config(Some(mtu))
            .stream_receive_window(window(stream_window)?)
            .receive_window(window(connection_window)?)
            .send_window(self.send_window)
            .max_concurrent_uni_streams(VarInt::from_u32(1024))
            .max_concurrent_bidi_streams(VarInt::from_u32(256))
            .enable_segmentation_offload(self.segmentation_offload_in_effect());
        Ok(Arc::new(transport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_never_exceed_what_the_socket_buffer_holds() {
        let defaults = QuicConfig::default();
        // Linux's default cap, 4 MiB, reported doubled: 4 MiB of payload.
        assert_eq!(defaults.windows_for(8 << 20), (4 << 20, 4 << 20));
        // A tiny buffer still leaves 1 MiB windows.
        assert_eq!(defaults.windows_for(200_000), (1 << 20, 1 << 20));
        // A generous kernel: the configured windows in full.
        let configured = (defaults.stream_receive_window, defaults.receive_window);
        assert_eq!(defaults.windows_for(1 << 30), configured);
    }

    #[test]
    fn segmentation_offload_is_never_combined_with_datagrams_too_large_for_a_batch() {
        let defaults = QuicConfig::default();
        let batch = usize::from(defaults.max_mtu) * QUINN_OFFLOAD_SEGMENTS;
        assert!(!defaults.segmentation_offload_in_effect() || batch <= OFFLOAD_SEND_LIMIT_BYTES);
        let jumbo = QuicConfig { max_mtu: 9000, segmentation_offload: true, ..defaults.clone() };
        assert!(!jumbo.segmentation_offload_in_effect(), "10 x 9000 B exceed one offloaded send");
        let ethernet = QuicConfig { max_mtu: 1452, segmentation_offload: true, ..defaults };
        assert!(ethernet.segmentation_offload_in_effect());
        assert!(!QuicConfig { segmentation_offload: false, ..ethernet }
            .segmentation_offload_in_effect());
    }
}
