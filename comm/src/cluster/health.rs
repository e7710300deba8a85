//! The job's health as one rank sees it: healthy, or failed because of a named peer.
//!
//! A [`Health`] is cheap to clone and shared by everything in the process that waits on peers:
//! the rendezvous client sets it when the rendezvous reports a failure or goes silent, and any
//! other layer (the collectives of this crate, a training loop) can [`Health::check`] it before
//! and during an operation, or `select!` on [`Health::failed`] to abort a blocked one. The first
//! failure wins and is never cleared: a job that lost a rank stays failed.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::ClusterError;

/// A rank that failed and how it was noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFailure {
    /// The rank.
    pub rank: usize,
    /// How it was noticed (e.g. "no heartbeat for 5.0 s", "exited with signal 9 (SIGKILL)").
    pub reason: String,
}

impl PeerFailure {
    /// The error that operations return once this failure is known.
    pub fn error(&self) -> ClusterError {
        ClusterError::PeerFailed { rank: self.rank, reason: self.reason.clone() }
    }
}

/// The shared failure state of one process's view of the job.
#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<watch::Sender<Option<(PeerFailure, Instant)>>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A healthy state.
    pub fn new() -> Self {
        Health { state: Arc::new(watch::channel(None).0) }
    }

    /// Records a failure, unless one is recorded already. Returns whether this one was recorded.
    pub fn fail(&self, failure: PeerFailure) -> bool {
        self.state.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some((failure, Instant::now()));
            true
        })
    }

    /// The failure, if any.
    pub fn failure(&self) -> Option<PeerFailure> {
        self.state.borrow().as_ref().map(|(failure, _)| failure.clone())
    }

    /// When the failure was recorded in this process, if any.
    pub fn failed_at(&self) -> Option<Instant> {
        self.state.borrow().as_ref().map(|(_, at)| *at)
    }

    /// `Ok` while healthy, else [`ClusterError::PeerFailed`] naming the rank.
    pub fn check(&self) -> Result<(), ClusterError> {
        match self.failure() {
            Some(failure) => Err(failure.error()),
            None => Ok(()),
        }
    }

    /// Resolves once a failure is recorded (at once if it is already).
    pub async fn failed(&self) -> PeerFailure {
        let mut receiver = self.state.subscribe();
        loop {
            if let Some((failure, _)) = receiver.borrow_and_update().as_ref() {
                return failure.clone();
            }
            // The sender lives in `self`, so the channel cannot close while we wait.
            if receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_failure_wins_and_wakes_waiters() {
        let health = Health::new();
        assert!(health.check().is_ok());
        let waiter = {
            let health = health.clone();
            tokio::spawn(async move { health.failed().await })
        };
        let first = PeerFailure { rank: 3, reason: "no heartbeat".to_string() };
        assert!(health.fail(first.clone()));
        assert!(!health.fail(PeerFailure { rank: 1, reason: "later".to_string() }));
        assert_eq!(waiter.await.unwrap(), first);
        match health.check() {
            Err(ClusterError::PeerFailed { rank, .. }) => assert_eq!(rank, 3),
            other => panic!("expected PeerFailed, got {other:?}"),
        }
    }
}
