//! One rank's membership of the job: join, store, barrier, heartbeats, and the watchdog that
//! declares rank 0 failed when the rendezvous goes silent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::health::{Health, PeerFailure};
use super::wire::{
    self, ClientMessage, MemberInfo, ServerMessage, MAX_TEXT_BYTES, MAX_VALUE_BYTES,
    PROTOCOL_VERSION,
};
use super::{ClusterConfig, ClusterError, Link};

/// The rank of the process that serves the rendezvous.
const RENDEZVOUS_RANK: usize = 0;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

/// A joined rank: the world, the store, barriers and the job's [`Health`].
#[derive(Debug)]
pub struct Member {
    rank: usize,
    members: Vec<MemberInfo>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    health: Health,
    pending: Pending,
    next_request: AtomicU64,
    leaving: Arc<AtomicBool>,
    farewell: Arc<Notify>,
    leave_timeout: Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl Member {
    /// Joins the rendezvous over `link` and waits until every rank has joined.
    ///
    /// Fails with [`ClusterError::JoinTimedOut`] naming the missing ranks when the world is not
    /// complete within `config.join_timeout`.
    pub async fn join(
        link: Link,
        me: MemberInfo,
        world_size: usize,
        config: &ClusterConfig,
    ) -> Result<Member, ClusterError> {
        let rank = me.rank as usize;
        let peer = link.peer.clone();
        let Link { reader, mut writer, guard, .. } = link;
        let join = ClientMessage::Join {
            version: PROTOCOL_VERSION,
            world_size: u32::try_from(world_size).unwrap_or(u32::MAX),
            member: me,
        };
        wire::write_frame(&mut writer, &join).await.map_err(|error| unreachable(&peer, error))?;
        let health = Health::new();
        let pending = Pending::default();
        let leaving = Arc::new(AtomicBool::new(false));
        let last_heard = Arc::new(Mutex::new(Instant::now()));
        let (outbox, outgoing) = mpsc::unbounded_channel();
        let (welcome_sender, welcome) = oneshot::channel();
        let farewell = Arc::new(Notify::new());
        let reader_task = tokio::spawn(
            Reader {
                rank,
                peer: peer.clone(),
                health: health.clone(),
                pending: pending.clone(),
                leaving: leaving.clone(),
                last_heard: last_heard.clone(),
                welcome: Some(welcome_sender),
                waited: config.join_timeout,
                farewell: farewell.clone(),
            }
            .run(reader),
        );
        let tasks = vec![
            reader_task,
            tokio::spawn(write_outbox(writer, outgoing, guard)),
            tokio::spawn(heartbeat(outbox.clone(), config.heartbeat_interval)),
            tokio::spawn(watchdog(health.clone(), last_heard, leaving.clone(), config.clone())),
        ];
        let mut member = Member {
            rank,
            members: Vec::new(),
            outbox,
            health,
            pending,
            next_request: AtomicU64::new(0),
            leaving,
            farewell,
            leave_timeout: config.failure_timeout,
            tasks,
        };
        let backstop = config.join_timeout + 2 * config.failure_timeout;
        member.members = tokio::select! {
            biased;
            welcome = welcome => welcome.unwrap_or_else(|_| Err(unreachable(&peer, "link closed"))),
            failure = member.health.failed() => Err(failure.error()),
            _ = tokio::time::sleep(backstop) => Err(ClusterError::Unreachable {
                peer: peer.clone(),
                reason: format!("no answer within {backstop:?}"),
            }),
        }?;
        Ok(member)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.members.len()
    }

    /// Every rank's description, ordered by rank.
    pub fn members(&self) -> &[MemberInfo] {
        &self.members
    }

    /// The job's health; clones observe the same state.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Stores `value` under `key` for every rank to `get`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), ClusterError> {
        check_length("key", key.len(), MAX_TEXT_BYTES)?;
        check_length("value", value.len(), MAX_VALUE_BYTES)?;
        self.send(ClientMessage::Set { key: key.to_string(), value: value.to_vec() })
    }

    /// The value of `key`, waiting until some rank sets it or a peer fails.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, ClusterError> {
        check_length("key", key.len(), MAX_TEXT_BYTES)?;
        let key = key.to_string();
        self.request(|request| ClientMessage::Get { request, key }).await
    }

    /// Waits until every rank has entered the barrier `name`, or a peer fails.
    pub async fn barrier(&self, name: &str) -> Result<(), ClusterError> {
        check_length("barrier name", name.len(), MAX_TEXT_BYTES)?;
        let name = name.to_string();
        self.request(|request| ClientMessage::Barrier { request, name }).await.map(|_| ())
    }

    /// Leaves the job in order: from now on this rank's silence is no failure.
    pub async fn leave(self) -> Result<(), ClusterError> {
        self.send(ClientMessage::Leave)?;
        self.leaving.store(true, Ordering::SeqCst);
        // Wait (bounded) until the rendezvous has recorded the departure, so that closing the
        // connection right after is not taken for a failure.
        let _ = tokio::time::timeout(self.leave_timeout, self.farewell.notified()).await;
        Ok(())
    }

    fn send(&self, message: ClientMessage) -> Result<(), ClusterError> {
        self.health.check()?;
        if self.leaving.load(Ordering::SeqCst) {
            return Err(ClusterError::Left { rank: self.rank });
        }
        self.outbox.send(Outgoing::Message(message)).map_err(|_| ClusterError::Unreachable {
            peer: "rendezvous".to_string(),
            reason: "link closed".to_string(),
        })
    }

    async fn request(
        &self,
        message: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<Vec<u8>, ClusterError> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        lock(&self.pending).insert(request, answer);
        if let Err(error) = self.send(message(request)) {
            lock(&self.pending).remove(&request);
            return Err(error);
        }
        tokio::select! {
            value = answered => value.map_err(|_| self.health.check().err().unwrap_or(
                ClusterError::Unreachable {
                    peer: "rendezvous".to_string(),
                    reason: "link closed".to_string(),
                })),
            failure = self.health.failed() => {
                lock(&self.pending).remove(&request);
                Err(failure.error())
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Tells the rendezvous over `link` that `rank` failed (a launcher does this when it sees one of
/// its workers exit), so that every other rank names the right rank at once.
pub async fn report_failure(mut link: Link, rank: usize, reason: &str) -> Result<(), ClusterError> {
    let mut reason = reason.to_string();
    reason.truncate(MAX_TEXT_BYTES);
    let message = ClientMessage::Report { rank: u32::try_from(rank).unwrap_or(u32::MAX), reason };
    wire::write_frame(&mut link.writer, &message)
        .await
        .map_err(|error| unreachable(&link.peer, error))?;
    let _ = link.writer.shutdown().await;
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unreachable(peer: &str, error: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unreachable { peer: peer.to_string(), reason: error.to_string() }
}

fn check_length(what: &'static str, length: usize, maximum: usize) -> Result<(), ClusterError> {
    if length > maximum {
        return Err(ClusterError::TooLarge { what, length, maximum });
    }
    Ok(())
}

/// Reads the rendezvous's messages and routes them.
struct Reader {
    rank: usize,
    peer: String,
    health: Health,
    pending: Pending,
    leaving: Arc<AtomicBool>,
    last_heard: Arc<Mutex<Instant>>,
    welcome: Option<oneshot::Sender<Result<Vec<MemberInfo>, ClusterError>>>,
    waited: Duration,
    farewell: Arc<Notify>,
}

impl Reader {
    async fn run(mut self, mut reader: Box<dyn AsyncRead + Unpin + Send>) {
        loop {
            match wire::read_server(&mut reader).await {
                Ok(message) => {
                    *lock(&self.last_heard) = Instant::now();
                    self.route(message);
                }
                Err(error) => {
                    if !self.leaving.load(Ordering::SeqCst) {
                        self.health.fail(PeerFailure {
                            rank: RENDEZVOUS_RANK,
                            reason: format!("rendezvous link to {} lost: {error}", self.peer),
                        });
                    }
                    return;
                }
            }
        }
    }

    fn route(&mut self, message: ServerMessage) {
        match message {
            ServerMessage::Welcome { members } => self.answer_join(Ok(members)),
            ServerMessage::Refused { reason } => {
                self.answer_join(Err(ClusterError::Refused { rank: self.rank, reason }))
            }
            ServerMessage::JoinTimedOut { missing } => {
                let missing: Vec<usize> = missing.into_iter().map(|rank| rank as usize).collect();
                self.answer_join(Err(ClusterError::JoinTimedOut {
                    missing: missing.clone(),
                    waited: self.waited,
                }));
                self.health.fail(PeerFailure {
                    rank: missing.first().copied().unwrap_or(RENDEZVOUS_RANK),
                    reason: format!("ranks {missing:?} never joined"),
                });
            }
            ServerMessage::Value { request, value } => self.answer(request, value),
            ServerMessage::BarrierDone { request } => self.answer(request, Vec::new()),
            ServerMessage::PeerFailed { rank, reason } => {
                self.health.fail(PeerFailure { rank: rank as usize, reason });
            }
            ServerMessage::Farewell => self.farewell.notify_one(),
            ServerMessage::Heartbeat => {}
        }
    }

    fn answer_join(&mut self, result: Result<Vec<MemberInfo>, ClusterError>) {
        if let Some(welcome) = self.welcome.take() {
            let _ = welcome.send(result);
        }
    }

    fn answer(&self, request: u64, value: Vec<u8>) {
        if let Some(answer) = lock(&self.pending).remove(&request) {
            let _ = answer.send(value);
        }
    }
}

/// What the writer task sends.
#[derive(Debug)]
enum Outgoing {
    Message(ClientMessage),
}

/// Writes the outbox; holds the link's guard (its connection) as long as it runs.
async fn write_outbox(
    mut writer: Box<dyn AsyncWrite + Unpin + Send>,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    _guard: Option<Box<dyn std::any::Any + Send>>,
) {
    while let Some(item) = outgoing.recv().await {
        let Outgoing::Message(message) = item;
        if wire::write_frame(&mut writer, &message).await.is_err() {
            return;
        }
    }
}

async fn heartbeat(outbox: mpsc::UnboundedSender<Outgoing>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if outbox.send(Outgoing::Message(ClientMessage::Heartbeat)).is_err() {
            return;
        }
    }
}

/// Declares rank 0 failed when the rendezvous has been silent for `failure_timeout`.
async fn watchdog(
    health: Health,
    last_heard: Arc<Mutex<Instant>>,
    leaving: Arc<AtomicBool>,
    config: ClusterConfig,
) {
    let mut ticker = tokio::time::interval(config.heartbeat_interval / 2);
    loop {
        ticker.tick().await;
        let silence = lock(&last_heard).elapsed();
        if silence > config.failure_timeout && !leaving.load(Ordering::SeqCst) {
            health.fail(PeerFailure {
                rank: RENDEZVOUS_RANK,
                reason: format!("rendezvous silent for {:.1} s", silence.as_secs_f64()),
            });
            return;
        }
    }
}
