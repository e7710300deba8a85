//! When the consumers of a GPU act may read what it enqueued.
//!
//! An act on a GPU returns once its kernels are enqueued on its device's stream. Consumers on
//! the same stream (the same device thread) may be told at once: stream order makes them read
//! after the kernels ran. A consumer on another stream or thread must not be told before the
//! work is done, so for an act with such a consumer the executor records an event on the
//! stream, leaves the act pending ([`meshflow_actor::Completion::Pending`]) and hands the event
//! to an [`EventWatcher`], whose thread reports the act complete once the event has completed.
//! [`crossing_actors`] is the rule; it is a function of the plan alone.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use meshflow_actor::Plan;

use crate::{Error, Result};

/// Work recorded on a stream that completes later (a CUDA event).
pub trait StreamEvent: Send + 'static {
    /// True once the work before the event has finished.
    fn is_complete(&self) -> Result<bool>;
}

impl StreamEvent for meshflow_ops::cuda::DeviceEvent {
    fn is_complete(&self) -> Result<bool> {
        Ok(meshflow_ops::cuda::DeviceEvent::is_complete(self)?)
    }
}

/// Per actor of `plan`, true when it has a consumer on another device thread (stream): its act
/// completes only after the event recorded at its end has completed.
pub fn crossing_actors<P>(plan: &Plan<P>) -> Vec<bool> {
    let mut crossing = vec![false; plan.actors.len()];
    for edge in &plan.edges {
        let device = plan.actors[edge.producer.index()].device;
        if edge.consumers.iter().any(|c| plan.actors[c.index()].device != device) {
            crossing[edge.producer.index()] = true;
        }
    }
    crossing
}

/// What to call once an event has completed.
pub type Notify = Box<dyn FnOnce() + Send>;

/// A thread that polls recorded events and calls each one's [`Notify`] once it has completed
/// (or once querying it failed: the consumer's own device calls then report the error, and
/// nothing waits forever). Dropping the watcher lets it finish the events it holds, then joins.
pub struct EventWatcher {
    sender: Option<Sender<(Box<dyn StreamEvent>, Notify)>>,
    thread: Option<JoinHandle<()>>,
}

impl EventWatcher {
    /// Starts the thread; it polls every `interval` while it holds events and sleeps otherwise.
    pub fn start(interval: Duration) -> Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("meshflow-events".into())
            .spawn(move || watch(receiver, interval))
            .map_err(|e| Error::Runtime(format!("starting the event watcher: {e}")))?;
        Ok(EventWatcher { sender: Some(sender), thread: Some(thread) })
    }

    /// Calls `notify` once `event` has completed.
    pub fn watch(&self, event: Box<dyn StreamEvent>, notify: Notify) -> Result<()> {
        let sender = self.sender.as_ref().ok_or_else(stopped)?;
        sender.send((event, notify)).map_err(|_| stopped())
    }
}

impl Drop for EventWatcher {
    fn drop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> Error {
    Error::Runtime("the event watcher has stopped".into())
}

/// The watcher's loop: takes new events (blocking only when it holds none), notifies the
/// completed ones, sleeps `interval`; ends when the channel is closed and nothing is pending.
fn watch(receiver: Receiver<(Box<dyn StreamEvent>, Notify)>, interval: Duration) {
    let mut pending: Vec<(Box<dyn StreamEvent>, Notify)> = Vec::new();
    loop {
        let next = if pending.is_empty() {
            receiver.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            receiver.recv_timeout(interval)
        };
        match next {
            Ok(item) => pending.push(item),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) if pending.is_empty() => return,
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(interval),
        }
        while let Ok(item) = receiver.try_recv() {
            pending.push(item);
        }
        let (done, waiting): (Vec<_>, Vec<_>) =
            pending.drain(..).partition(|(event, _)| event.is_complete().unwrap_or(true));
        pending = waiting;
        done.into_iter().for_each(|(_, notify)| notify());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use meshflow_actor::{ActorKind, DeviceId};

    use super::*;

    struct Flag(Arc<AtomicBool>);

    impl StreamEvent for Flag {
        fn is_complete(&self) -> Result<bool> {
            Ok(self.0.load(Ordering::SeqCst))
        }
    }

    struct Broken;

    impl StreamEvent for Broken {
        fn is_complete(&self) -> Result<bool> {
            Err(Error::Runtime("cuEventQuery failed".into()))
        }
    }

    #[test]
    fn consumers_on_another_device_thread_cross_streams() {
        let mut plan: Plan<()> = Plan::new();
        let producer = plan.add_actor("producer", ActorKind::Compute, DeviceId(0), ());
        let same = plan.add_actor("same", ActorKind::Compute, DeviceId(0), ());
        let other = plan.add_actor("other", ActorKind::Compute, DeviceId(1), ());
        plan.add_edge(producer, &[same], 1);
        assert_eq!(crossing_actors(&plan), vec![false; 3], "same-stream consumers: at once");
        plan.add_edge(producer, &[same, other], 1);
        plan.add_edge(same, &[other], 1);
        assert_eq!(crossing_actors(&plan), vec![true, true, false], "device 1 waits for events");
    }

    #[test]
    fn notifies_only_after_the_event_completes() {
        let watcher = EventWatcher::start(Duration::from_micros(200)).expect("a watcher");
        let (flag, told) = (Arc::new(AtomicBool::new(false)), mpsc::channel());
        let sender = told.0.clone();
        let notify: Notify = Box::new(move || sender.send("first").expect("the test listens"));
        watcher.watch(Box::new(Flag(flag.clone())), notify).expect("watch");
        let sender = told.0.clone();
        let notify: Notify = Box::new(move || sender.send("broken").expect("the test listens"));
        watcher.watch(Box::new(Broken), notify).expect("watch");
        let first = told.1.recv_timeout(Duration::from_secs(5)).expect("a failed query notifies");
        assert_eq!(first, "broken");
        std::thread::sleep(Duration::from_millis(20));
        assert!(told.1.try_recv().is_err(), "not told while the event is pending");
        flag.store(true, Ordering::SeqCst);
        let second = told.1.recv_timeout(Duration::from_secs(5)).expect("told once complete");
        assert_eq!(second, "first");
        drop(watcher);
    }
}
