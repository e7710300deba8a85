//! Comm operations that obey the job's [`Health`]: [`WatchedTransport`] around any
//! [`Transport`], [`WatchedCommunicator`] around any [`Communicator`].
//!
//! Once the failure detection records a failed rank, every operation of the job ends with
//! [`Error::PeerFailed`] naming it:
//! - a later operation fails at once, before it touches the network;
//! - a blocked one wakes: when the failure is recorded, the transport's *abort* runs (for QUIC,
//!   closing the endpoint, which ends every pending read and write), and the error the inner
//!   transport then returns is replaced by the named failure;
//! - an operation that failed on its own (a peer closed its connection because it learned of the
//!   failure first, or a wait timed out) waits up to `settle` for the failure detection to name
//!   the cause, so that survivors name the failed rank, not a survivor that exited before them.
//!
//! Without an abort (a transport that cannot be interrupted) a blocked operation ends at the
//! inner transport's own timeout, and still names the failed rank.

use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{bounded, Receiver};
use meshflow_ops::Tensor;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::health::{Health, PeerFailure};
use crate::transport::Arrived;
use crate::{Channel, Communicator, Error, Message, Piece, Rank, ReduceOp, Result, Transport};

/// What makes a transport's blocked operations return; runs once, when a failure is recorded.
pub type Abort = Box<dyn FnOnce() + Send>;

/// A [`Transport`] whose operations fail, naming the failed rank, once [`Health`] records one.
pub struct WatchedTransport {
    inner: Arc<dyn Transport>,
    health: Health,
    /// Disconnects (every receiver wakes) when the failure is recorded.
    tripped: Receiver<()>,
    settle: Duration,
    watcher: JoinHandle<()>,
}

impl WatchedTransport {
    /// Watches `health` on `runtime`; when it records a failure, runs `abort` (which must make
    /// `inner`'s blocked operations return, e.g. close its QUIC endpoint). An operation that
    /// fails on its own waits up to `settle` for the failure detection to name a failed rank
    /// (the failure timeout plus a heartbeat is a safe choice).
    pub fn new(
        inner: Arc<dyn Transport>,
        health: Health,
        runtime: &Handle,
        settle: Duration,
        abort: Abort,
    ) -> Self {
        let (trip, tripped) = bounded::<()>(0);
        let watched = health.clone();
        let watcher = runtime.spawn(async move {
            watched.failed().await;
            drop(trip);
            abort();
        });
        WatchedTransport { inner, health, tripped, settle, watcher }
    }

    /// The health it watches.
    pub fn health(&self) -> &Health {
        &self.health
    }

    fn guard<T>(&self, operation: &str, call: impl FnOnce() -> Result<T>) -> Result<T> {
        if let Some(failure) = self.health.failure() {
            return Err(failed(&failure, operation));
        }
        call().map_err(|error| self.explain(operation, error))
    }

    /// The named failure instead of `error` when one is (or, within `settle`, becomes) known.
    fn explain(&self, operation: &str, error: Error) -> Error {
        if !matches!(
            error,
            Error::Timeout { .. } | Error::PeerClosed { .. } | Error::InvalidFrame { .. }
        ) {
            return error;
        }
        if self.health.failure().is_none() {
            // Returns at once when tripped (the channel disconnects), else after `settle`.
            let _ = self.tripped.recv_timeout(self.settle);
        }
        match self.health.failure() {
            Some(failure) => failed(&failure, operation),
            None => error,
        }
    }
}

impl std::fmt::Debug for WatchedTransport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WatchedTransport")
            .field("rank", &self.inner.rank())
            .field("world_size", &self.inner.world_size())
            .field("failure", &self.health.failure())
            .finish()
    }
}

impl Drop for WatchedTransport {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Transport for WatchedTransport {
    fn rank(&self) -> Rank {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    fn send(&self, peer: Rank, channel: Channel, message: Message) -> Result<()> {
        self.guard("send", || self.inner.send(peer, channel, message))
    }

    fn recv(&self, peer: Rank, channel: Channel) -> Result<Message> {
        self.guard("recv", || self.inner.recv(peer, channel))
    }

    fn exchange(
        &self,
        channel: Channel,
        sends: Vec<(Rank, Message)>,
        receives: &[Rank],
    ) -> Result<Vec<Message>> {
        self.guard("exchange", || self.inner.exchange(channel, sends, receives))
    }

    fn stream_exchange(
        &self,
        sends: Vec<(Channel, Piece)>,
        receives: &[(Rank, Channel)],
        arrived: &mut Arrived<'_>,
    ) -> Result<()> {
        self.guard("exchange", || self.inner.stream_exchange(sends, receives, arrived))
    }
}

/// A [`Communicator`] whose collectives fail, naming the failed rank and the collective, once
/// [`Health`] records a failure. Put it over a communicator whose transport is a
/// [`WatchedTransport`] on the same health, so that blocked collectives wake too.
pub struct WatchedCommunicator {
    inner: Box<dyn Communicator>,
    health: Health,
}

impl WatchedCommunicator {
    /// Watches `health` around `inner`.
    pub fn new(inner: Box<dyn Communicator>, health: Health) -> Self {
        WatchedCommunicator { inner, health }
    }

    fn guard<T>(
        &mut self,
        collective: &str,
        call: impl FnOnce(&mut dyn Communicator) -> Result<T>,
    ) -> Result<T> {
        if let Some(failure) = self.health.failure() {
            return Err(failed(&failure, collective));
        }
        call(self.inner.as_mut()).map_err(|error| match self.health.failure() {
            Some(failure) => failed(&failure, collective),
            None => error,
        })
    }
}

impl Communicator for WatchedCommunicator {
    fn group_index(&self) -> usize {
        self.inner.group_index()
    }

    fn group_size(&self) -> usize {
        self.inner.group_size()
    }

    fn all_reduce(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        self.guard("all_reduce", |inner| inner.all_reduce(tensor, operation))
    }

    fn reduce_scatter(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor> {
        self.guard("reduce_scatter", |inner| inner.reduce_scatter(tensor, operation))
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor> {
        self.guard("all_gather", |inner| inner.all_gather(tensor))
    }

    fn all_to_all(&mut self, tensor: &Tensor) -> Result<Tensor> {
        self.guard("all_to_all", |inner| inner.all_to_all(tensor))
    }

    fn broadcast(&mut self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        self.guard("broadcast", |inner| inner.broadcast(tensor, root))
    }

    fn reduce(
        &mut self,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        self.guard("reduce", |inner| inner.reduce(tensor, operation, root))
    }

    fn send(&mut self, tensor: &Tensor, to: usize) -> Result<()> {
        self.guard("send", |inner| inner.send(tensor, to))
    }

    fn recv(&mut self, from: usize) -> Result<Tensor> {
        self.guard("recv", |inner| inner.recv(from))
    }
}

fn failed(failure: &PeerFailure, operation: &str) -> Error {
    Error::PeerFailed {
        peer: Rank(failure.rank),
        operation: operation.to_string(),
        reason: failure.reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use super::*;
    use crate::quic::{JobSecret, QuicConfig, QuicEndpoint, QuicTransport};
    use crate::{InProcessTransport, TransportCommunicator};

    fn endpoints(count: usize, secret: &JobSecret) -> Vec<QuicEndpoint> {
        let config = QuicConfig::default().with_timeouts(Duration::from_secs(20));
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        (0..count)
            .map(|rank| {
                QuicEndpoint::bind(local, Rank(rank), secret.clone(), config.clone()).expect("bind")
            })
            .collect()
    }

    /// Two QUIC ranks, each transport watched (abort closes its endpoint).
    fn watched_pair(healths: &[Health; 2]) -> Vec<WatchedTransport> {
        let secret = JobSecret::generate().expect("secret");
        let endpoints = endpoints(2, &secret);
        let addresses: Vec<SocketAddr> =
            endpoints.iter().map(|endpoint| endpoint.local_address().expect("address")).collect();
        let threads: Vec<_> = endpoints
            .into_iter()
            .zip(healths.iter().cloned())
            .map(|(endpoint, health)| {
                let addresses = addresses.clone();
                std::thread::spawn(move || {
                    let transport =
                        QuicTransport::connect_mesh(endpoint.clone(), &addresses).expect("mesh");
                    let closer = endpoint.clone();
                    WatchedTransport::new(
                        Arc::new(transport),
                        health,
                        &endpoint.runtime(),
                        Duration::from_secs(5),
                        Box::new(move || closer.close()),
                    )
                })
            })
            .collect();
        threads.into_iter().map(|thread| thread.join().expect("thread")).collect()
    }

    #[test]
    fn a_blocked_collective_wakes_and_names_the_failed_rank() {
        let healths = [Health::new(), Health::new()];
        let transports = watched_pair(&healths);
        let mut communicators: Vec<WatchedCommunicator> = transports
            .into_iter()
            .zip(healths.iter())
            .map(|(transport, health)| {
                let inner = TransportCommunicator::world(Arc::new(transport)).expect("group");
                WatchedCommunicator::new(Box::new(inner), health.clone())
            })
            .collect();
        let input = Tensor::from_slice(&[1.0f32; 4], [4]).expect("tensor");
        // Rank 1 never joins the all-reduce: rank 0 blocks until its health names rank 1.
        let mut survivor = communicators.remove(0);
        let health = healths[0].clone();
        let failer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            health.fail(PeerFailure { rank: 1, reason: "no heartbeat for 1.5 s".into() });
            Instant::now()
        });
        let error = survivor.all_reduce(&input, ReduceOp::Sum).expect_err("rank 1 is gone");
        let woke = Instant::now();
        let failed_at = failer.join().expect("thread");
        assert!(
            matches!(&error, Error::PeerFailed { peer: Rank(1), operation, reason }
                if operation == "all_reduce" && reason.contains("no heartbeat")),
            "{error}"
        );
        // Woken by the failure, not by the 20 s operation timeout.
        assert!(woke.duration_since(failed_at) < Duration::from_secs(10), "{error}");
        let later = survivor.all_gather(&input).expect_err("the job has failed");
        assert!(matches!(later, Error::PeerFailed { peer: Rank(1), .. }), "{later}");
    }

    #[test]
    fn an_error_of_a_peer_that_left_first_is_named_after_the_failed_rank() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let runtime = runtime.expect("runtime");
        let health = Health::new();
        let world = InProcessTransport::world(2, 1, Duration::from_millis(100));
        let watched = WatchedTransport::new(
            Arc::new(world[0].clone()),
            health.clone(),
            runtime.handle(),
            Duration::from_secs(10),
            Box::new(|| {}),
        );
        // The recv times out after 100 ms; the failure is recorded during the settle wait.
        let failer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            health.fail(PeerFailure { rank: 7, reason: "exited with status 1".into() });
        });
        let driver = std::thread::spawn(move || {
            runtime.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
        });
        let error = watched.recv(Rank(1), Channel(0)).expect_err("nothing was sent");
        assert!(
            matches!(&error, Error::PeerFailed { peer: Rank(7), operation, .. } if operation == "recv"),
            "{error}"
        );
        failer.join().expect("thread");
        driver.join().expect("thread");
    }

    #[test]
    fn without_a_failure_errors_and_values_pass_through() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let runtime = runtime.expect("runtime");
        let world = InProcessTransport::world(2, 1, Duration::from_millis(50));
        let watch = |transport: &InProcessTransport| {
            WatchedTransport::new(
                Arc::new(transport.clone()),
                Health::new(),
                runtime.handle(),
                Duration::from_millis(50),
                Box::new(|| {}),
            )
        };
        let (first, second) = (watch(&world[0]), watch(&world[1]));
        let tensor = Tensor::from_slice(&[3.0f32; 2], [2]).expect("tensor");
        let tag = crate::Tag { kind: crate::MessageKind::Send, sequence: 4, step: 0 };
        first.send(Rank(1), Channel(2), Message { tag, tensor }).expect("send");
        let received = second.recv(Rank(0), Channel(2)).expect("recv");
        assert_eq!(received.tag.sequence, 4);
        assert_eq!(received.tensor.to_vec::<f32>().expect("values"), vec![3.0, 3.0]);
        let error = second.recv(Rank(0), Channel(2)).expect_err("empty");
        assert!(matches!(error, Error::Timeout { peer: Rank(0), .. }), "{error}");
    }
}
