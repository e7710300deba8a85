//! The job's health as one rank sees it: healthy, or failed because of a named peer.
//!
//! A [`Health`] is cheap to clone and shared by everything in the process that waits on peers:
//! the rendezvous client sets it when the rendezvous reports a failure or goes silent, and any
//! other layer (the collectives of this crate, a training loop) can [`Health::check`] it before
//! and during an operation, or `select!` on [`Health::failed`] to abort a blocked one; code that
//! blocks on threads registers [`Health::on_failure`] to be woken. The first failure wins and is
//! never cleared: a job that lost a rank stays failed.
//!
//! The same state serves the device threads of one process: when one of them fails, the session
//! records it, and the in-process collectives its peers wait in end at once instead of at their
//! timeout.

use std::fmt;
use std::sync::{Arc, Mutex};
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

/// A callback that runs once, on the thread that records the failure, and whether it still
/// has anything to wake (a callback for a dropped target is pruned at the next registration).
struct Wake {
    alive: Box<dyn Fn() -> bool + Send>,
    call: Box<dyn FnOnce(&PeerFailure) + Send>,
}

/// The shared failure state of one process's view of the job.
#[derive(Clone)]
pub struct Health {
    state: Arc<watch::Sender<Option<(PeerFailure, Instant)>>>,
    /// Called when the failure is recorded; `None` once it has been.
    wakes: Arc<Mutex<Option<Vec<Wake>>>>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health").field("failure", &self.failure()).finish()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A healthy state.
    pub fn new() -> Self {
        Health {
            state: Arc::new(watch::channel(None).0),
            wakes: Arc::new(Mutex::new(Some(Vec::new()))),
        }
    }

    /// Records a failure, unless one is recorded already. Returns whether this one was recorded;
    /// when it was, every [`Health::on_failure`] callback runs on this thread.
    pub fn fail(&self, failure: PeerFailure) -> bool {
        let recorded = self.state.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some((failure.clone(), Instant::now()));
            true
        });
        if recorded {
            let wakes = self.lock_wakes().take().unwrap_or_default();
            wakes.into_iter().for_each(|wake| (wake.call)(&failure));
        }
        recorded
    }

    /// Calls `wake` once a failure is recorded: at once (on this thread) if it already is,
    /// otherwise on the thread that records it. For waits outside an async runtime (condition
    /// variables, channels) that must end when the job fails.
    pub fn on_failure(&self, wake: impl FnOnce(&PeerFailure) + Send + 'static) {
        self.register(Wake { alive: Box::new(|| true), call: Box::new(wake) });
    }

    /// [`Health::on_failure`] for a callback about `target`, which it holds weakly: it runs only
    /// if `target` still lives, and is forgotten once `target` is dropped, so objects that come
    /// and go (a session's transports and groups) leave nothing behind in a long-lived `Health`.
    pub fn on_failure_of<T: Send + Sync + 'static>(
        &self,
        target: &Arc<T>,
        wake: impl FnOnce(&T, &PeerFailure) + Send + 'static,
    ) {
        let (probe, weak) = (Arc::downgrade(target), Arc::downgrade(target));
        self.register(Wake {
            alive: Box::new(move || probe.strong_count() > 0),
            call: Box::new(move |failure| {
                if let Some(target) = weak.upgrade() {
                    wake(&target, failure);
                }
            }),
        });
    }

    fn register(&self, wake: Wake) {
        let mut wakes = self.lock_wakes();
        match wakes.as_mut() {
            Some(wakes) => {
                wakes.retain(|wake| (wake.alive)());
                wakes.push(wake);
            }
            None => {
                drop(wakes);
                if let Some(failure) = self.failure() {
                    (wake.call)(&failure);
                }
            }
        }
    }

    fn lock_wakes(&self) -> std::sync::MutexGuard<'_, Option<Vec<Wake>>> {
        self.wakes.lock().unwrap_or_else(|poison| poison.into_inner())
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

    #[test]
    fn callbacks_run_once_on_the_first_failure_or_at_once_when_registered_after_it() {
        let health = Health::new();
        let (sender, seen) = std::sync::mpsc::channel();
        let early = sender.clone();
        health.on_failure(move |failure| early.send(("early", failure.rank)).unwrap());
        assert!(seen.try_recv().is_err(), "nothing has failed yet");
        health.fail(PeerFailure { rank: 2, reason: "act failed".to_string() });
        health.fail(PeerFailure { rank: 5, reason: "later".to_string() });
        health.on_failure(move |failure| sender.send(("late", failure.rank)).unwrap());
        let seen: Vec<_> = seen.try_iter().collect();
        assert_eq!(seen, [("early", 2), ("late", 2)]);
    }

    #[test]
    fn callbacks_about_dropped_targets_are_forgotten_and_live_ones_still_run() {
        let health = Health::new();
        let (sender, seen) = std::sync::mpsc::channel();
        let kept = Arc::new(7usize);
        health.on_failure_of(&kept, move |value, failure| {
            sender.send((*value, failure.rank)).unwrap()
        });
        for session in 0..100usize {
            let target = Arc::new(session);
            health.on_failure_of(&target, |_, _| panic!("a dropped target is never woken"));
        }
        let registered = health.lock_wakes().as_ref().map_or(0, Vec::len);
        assert_eq!(registered, 2, "the live callback and the last one registered");
        health.fail(PeerFailure { rank: 4, reason: "gone".to_string() });
        assert_eq!(seen.try_iter().collect::<Vec<_>>(), [(7, 4)]);
    }
}
