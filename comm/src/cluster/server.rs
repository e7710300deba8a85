//! The rendezvous served by rank 0: one task owns all state; one task per link reads frames into
//! it, one writes its outbox. Nothing a peer sends can panic it: frames are bounded and validated,
//! and a link that sends anything invalid is dropped (the job goes on).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::wire::{
    self, ClientMessage, MemberInfo, ServerMessage, MAX_WORLD_SIZE, PROTOCOL_VERSION,
};
use super::{ClusterConfig, Link};

/// How long a new link has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running rendezvous. Dropping it stops it; [`Rendezvous::finish`] first waits for the members
/// to leave.
#[derive(Debug)]
pub struct Rendezvous {
    links: mpsc::Sender<Link>,
    finish: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: JoinHandle<()>,
}

impl Rendezvous {
    /// Starts a rendezvous for `world_size` ranks on the current tokio runtime.
    pub fn start(world_size: usize, config: ClusterConfig) -> Self {
        let (links, incoming) = mpsc::channel(64);
        let (finish, finish_requests) = oneshot::channel();
        let world_size = u32::try_from(world_size).unwrap_or(u32::MAX);
        let server = Server::new(world_size, config);
        let task = tokio::spawn(server.run(incoming, finish_requests));
        Rendezvous { links, finish: Some(finish), task }
    }

    /// Hands over a new (authenticated) link; returns false if the rendezvous has stopped.
    pub async fn accept(&self, link: Link) -> bool {
        self.links.send(link).await.is_ok()
    }

    /// A sender of links, for an accept loop that runs in its own task.
    pub fn acceptor(&self) -> mpsc::Sender<Link> {
        self.links.clone()
    }

    /// Waits until every member has left or failed (at most `timeout`), then stops.
    pub async fn finish(mut self, timeout: Duration) {
        let (done, finished) = oneshot::channel();
        if let Some(finish) = self.finish.take() {
            if finish.send(done).is_ok() {
                let _ = tokio::time::timeout(timeout, finished).await;
            }
        }
        self.task.abort();
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What link tasks tell the server task.
enum Event {
    Joined {
        version: u32,
        world_size: u32,
        member: MemberInfo,
        outbox: mpsc::UnboundedSender<ServerMessage>,
        accepted: oneshot::Sender<bool>,
    },
    Reported {
        rank: u32,
        reason: String,
    },
    Message {
        rank: u32,
        message: ClientMessage,
    },
    Closed {
        rank: u32,
        reason: String,
    },
}

struct Seat {
    outbox: mpsc::UnboundedSender<ServerMessage>,
    info: MemberInfo,
    last_heard: Instant,
    left: bool,
}

struct Server {
    world_size: u32,
    config: ClusterConfig,
    started: Instant,
    seats: BTreeMap<u32, Seat>,
    welcomed: bool,
    failed: Option<(u32, String)>,
    store: HashMap<String, Vec<u8>>,
    waiting: HashMap<String, Vec<(u32, u64)>>,
    barriers: HashMap<String, Vec<(u32, u64)>>,
    events: mpsc::UnboundedSender<Event>,
}

impl Server {
    fn new(world_size: u32, config: ClusterConfig) -> Self {
        Server {
            world_size,
            config,
            started: Instant::now(),
            seats: BTreeMap::new(),
            welcomed: false,
            failed: None,
            store: HashMap::new(),
            waiting: HashMap::new(),
            barriers: HashMap::new(),
            events: mpsc::unbounded_channel().0,
        }
    }

    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Link>,
        mut finish: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let (events, mut received) = mpsc::unbounded_channel();
        self.events = events;
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        let mut finished: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                Some(link) = incoming.recv() => self.spawn_link(link),
                Some(event) = received.recv() => self.handle(event),
                _ = ticker.tick() => self.tick(),
                Ok(done) = &mut finish, if finished.is_none() => finished = Some(done),
            }
            if finished.is_some() && self.all_gone() {
                if let Some(done) = finished.take() {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    fn all_gone(&self) -> bool {
        self.failed.is_some() || self.seats.values().all(|seat| seat.left)
    }

    fn spawn_link(&self, link: Link) {
        tokio::spawn(serve_link(link, self.events.clone()));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Joined { version, world_size, member, outbox, accepted } => {
                let verdict = self.admit(version, world_size, &member);
                let _ = accepted.send(verdict.is_ok());
                match verdict {
                    Ok(()) => self.seat(member, outbox),
                    Err(reason) => {
                        let _ = outbox.send(ServerMessage::Refused { reason });
                    }
                }
            }
            Event::Reported { rank, reason } => {
                if rank < self.world_size {
                    self.fail(rank, format!("{reason} (reported by its launcher)"));
                }
            }
            Event::Message { rank, message } => self.on_message(rank, message),
            Event::Closed { rank, reason } => {
                let departed = self.seats.get(&rank).is_none_or(|seat| seat.left);
                if !departed {
                    self.fail(rank, format!("connection lost: {reason}"));
                }
            }
        }
    }

    fn admit(&self, version: u32, world_size: u32, member: &MemberInfo) -> Result<(), String> {
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {version}, the rendezvous speaks {PROTOCOL_VERSION}"
            ));
        }
        if world_size != self.world_size {
            return Err(format!(
                "world size {world_size}, the rendezvous was started for {}",
                self.world_size
            ));
        }
        if member.rank >= self.world_size || member.rank >= MAX_WORLD_SIZE {
            return Err(format!("rank {} outside the world of {}", member.rank, self.world_size));
        }
        if self.seats.contains_key(&member.rank) {
            return Err(format!("rank {} has joined already", member.rank));
        }
        if let Some((rank, reason)) = &self.failed {
            return Err(format!("the job has failed: rank {rank}: {reason}"));
        }
        Ok(())
    }

    fn seat(&mut self, member: MemberInfo, outbox: mpsc::UnboundedSender<ServerMessage>) {
        let seat = Seat { outbox, info: member.clone(), last_heard: Instant::now(), left: false };
        self.seats.insert(member.rank, seat);
        if self.seats.len() == self.world_size as usize {
            let members: Vec<MemberInfo> =
                self.seats.values().map(|seat| seat.info.clone()).collect();
            self.welcomed = true;
            self.broadcast(&ServerMessage::Welcome { members });
        }
    }

    fn on_message(&mut self, rank: u32, message: ClientMessage) {
        if let Some(seat) = self.seats.get_mut(&rank) {
            seat.last_heard = Instant::now();
        }
        match message {
            ClientMessage::Set { key, value } => self.set(key, value),
            ClientMessage::Get { request, key } => match self.store.get(&key) {
                Some(value) => {
                    self.send(rank, ServerMessage::Value { request, value: value.clone() })
                }
                None => self.waiting.entry(key).or_default().push((rank, request)),
            },
            ClientMessage::Barrier { request, name } => self.enter_barrier(rank, request, name),
            ClientMessage::Leave => {
                if let Some(seat) = self.seats.get_mut(&rank) {
                    seat.left = true;
                }
                self.send(rank, ServerMessage::Farewell);
            }
            // A second join or a report on a member link is a protocol breach: drop the member.
            ClientMessage::Join { .. } | ClientMessage::Report { .. } => {
                self.fail(rank, "broke the rendezvous protocol".to_string())
            }
            ClientMessage::Heartbeat => {}
        }
    }

    fn set(&mut self, key: String, value: Vec<u8>) {
        for (rank, request) in self.waiting.remove(&key).unwrap_or_default() {
            let value = value.clone();
            self.send(rank, ServerMessage::Value { request, value });
        }
        self.store.insert(key, value);
    }

    fn enter_barrier(&mut self, rank: u32, request: u64, name: String) {
        let arrived = self.barriers.entry(name.clone()).or_default();
        arrived.push((rank, request));
        if arrived.len() < self.world_size as usize {
            return;
        }
        for (rank, request) in self.barriers.remove(&name).unwrap_or_default() {
            self.send(rank, ServerMessage::BarrierDone { request });
        }
    }

    fn tick(&mut self) {
        self.broadcast(&ServerMessage::Heartbeat);
        if self.failed.is_some() {
            return;
        }
        if !self.welcomed && self.started.elapsed() > self.config.join_timeout {
            let missing: Vec<u32> =
                (0..self.world_size).filter(|rank| !self.seats.contains_key(rank)).collect();
            self.failed = Some((missing.first().copied().unwrap_or(0), "never joined".into()));
            self.broadcast(&ServerMessage::JoinTimedOut { missing });
            return;
        }
        let silent = self
            .seats
            .iter()
            .filter(|(_, seat)| {
                !seat.left && seat.last_heard.elapsed() > self.config.failure_timeout
            })
            .min_by_key(|(_, seat)| seat.last_heard)
            .map(|(rank, seat)| (*rank, seat.last_heard.elapsed()));
        if let Some((rank, silence)) = silent {
            self.fail(rank, format!("no heartbeat for {:.1} s", silence.as_secs_f64()));
        }
    }

    fn fail(&mut self, rank: u32, reason: String) {
        if self.failed.is_some() {
            return;
        }
        self.failed = Some((rank, reason.clone()));
        self.broadcast(&ServerMessage::PeerFailed { rank, reason });
    }

    fn send(&self, rank: u32, message: ServerMessage) {
        if let Some(seat) = self.seats.get(&rank) {
            let _ = seat.outbox.send(message);
        }
    }

    fn broadcast(&self, message: &ServerMessage) {
        for seat in self.seats.values().filter(|seat| !seat.left) {
            let _ = seat.outbox.send(message.clone());
        }
    }
}

/// Serves one link: the first message decides whether it is a member or a launcher's report.
async fn serve_link(link: Link, events: mpsc::UnboundedSender<Event>) {
    let Link { mut reader, writer, peer, proven_rank, guard: _guard } = link;
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, wire::read_client(&mut reader)).await;
    let (version, world_size, member) = match first {
        Ok(Ok(ClientMessage::Join { version, world_size, member }))
            if proven_rank.is_none_or(|proven| proven == member.rank as usize) =>
        {
            (version, world_size, member)
        }
        Ok(Ok(ClientMessage::Report { rank, reason })) => {
            let _ = events.send(Event::Reported { rank, reason });
            return;
        }
        // Anything else from a link that has not joined is dropped with the link.
        _ => return,
    };
    let rank = member.rank;
    let (outbox, outgoing) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_outbox(writer, outgoing));
    let (accepted, verdict) = oneshot::channel();
    let joined = Event::Joined { version, world_size, member, outbox, accepted };
    if events.send(joined).is_err() || !matches!(verdict.await, Ok(true)) {
        let _ = writer_task.await;
        return;
    }
    let reason = loop {
        match wire::read_client(&mut reader).await {
            Ok(message) => {
                if events.send(Event::Message { rank, message }).is_err() {
                    return;
                }
            }
            Err(error) => break format!("{error} (from {peer})"),
        }
    };
    let _ = events.send(Event::Closed { rank, reason });
}

async fn write_outbox(
    mut writer: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    mut outgoing: mpsc::UnboundedReceiver<ServerMessage>,
) {
    while let Some(message) = outgoing.recv().await {
        let refused = matches!(message, ServerMessage::Refused { .. });
        if wire::write_frame(&mut writer, &message).await.is_err() || refused {
            break;
        }
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut writer).await;
}
