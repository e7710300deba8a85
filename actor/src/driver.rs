//! The threaded driver: one OS thread per device stream, owning that device's actors.
//!
//! Each thread has one mailbox (a crossbeam channel) through which everything enters: batches of
//! messages from other threads, commands from the [`Driver`], and completions of asynchronous acts
//! (a [`CompletionHandle`]). Messages between actors of one thread go through a local queue and
//! never touch a channel; messages to other threads are collected per thread and sent as one batch
//! when the local queue runs dry ([`DriverConfig::batch`]).
//!
//! A hop between threads is cheap when the receiver is awake: an idle thread polls its mailbox
//! for [`DriverConfig::spin`] before it parks, so an answer that comes within that budget costs
//! no wake-up. The sender pays no system call either while the receiver spins: the channel wakes
//! a receiver only when one is registered as blocked (an atomic flag that crossbeam's sender
//! checks before it locks and unparks), and a spinning receiver never registers. A parked
//! receiver costs the sender an unpark and the receiver a wake-up, several microseconds on a
//! virtual machine; the `actor` bench prints both.
//!
//! The spinning thread puts a `spin_loop` hint between polls and yields the core after every
//! sixteen (about a microsecond). Without the yields, two threads that the scheduler placed on
//! one core (as it does on a busy machine, waking a thread next to its waker) take turns by
//! exhausting their budgets: each hop then costs the whole budget, 23 µs against 1 µs with the
//! yields in one measurement at a load of 13 on 2 cores.
//!
//! An executor error, a protocol error or a panic on any thread ends the step everywhere: the
//! failing thread raises a shared abort flag and reports; the driver tells every thread to abort,
//! joins them all and returns the error. With [`DriverConfig::step_timeout`] set, a step that
//! cannot finish (an under-provisioned plan) ends in [`Error::StepTimeout`] listing the blocked
//! actors and what each waits for.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::executor::run_act;
use crate::{
    ActStart, Action, Actor, ActorId, Blocked, Command, Completion, DeviceId, Envelope, Error,
    Executor, Message, Plan, RegisterUsage, Topology, Trace, TraceEvent,
};

/// How the threaded driver behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverConfig {
    /// How long an idle thread keeps polling its mailbox (with a `spin_loop` hint between polls)
    /// before it parks; a message that arrives within it costs neither side a system call.
    /// Default 20 µs, about three wake-ups of a parked thread on a virtual machine: long enough
    /// to catch the answer of a peer thread, short enough to give the core back soon when the
    /// thread is truly idle. Zero parks at once.
    pub spin: Duration,
    /// Whether messages to another thread wait until the local queue runs dry and then go as one
    /// mail per thread (default), or each goes at once as a mail of its own.
    pub batch: bool,
    /// Whether to record every act (see [`RunReport::trace`]). Default off.
    pub trace: bool,
    /// How long a step (or the stop) may take before the driver aborts it. Default none.
    pub step_timeout: Option<Duration>,
    /// Cores to bind the device threads to, round-robin by device id
    /// ([`crate::affinity::core_for`]); empty (the default): threads go where the operating
    /// system puts them. A thread that cannot be bound runs unbound.
    pub cores: Vec<usize>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(20),
            batch: true,
            trace: false,
            step_timeout: None,
            cores: Vec::new(),
        }
    }
}

/// What the driver hands back when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Every act, when tracing was on, ordered by start time.
    pub trace: Trace,
    /// Per actor, the most registers it held and its budget.
    pub usage: Vec<RegisterUsage>,
}

/// Lets an executor report the end of an act it left [`Completion::Pending`].
#[derive(Clone, Debug)]
pub struct CompletionHandle {
    mailbox: Sender<Mail>,
}

impl CompletionHandle {
    /// The act of `actor` has finished; it re-enters the owning thread like a message.
    pub fn complete(&self, actor: ActorId) -> Result<(), Error> {
        self.mailbox.send(Mail::Completion(actor)).map_err(|_| Error::Stopped {
            reason: format!("completion of {actor} after its thread ended"),
        })
    }
}

#[derive(Debug)]
enum Mail {
    Batch(Vec<Envelope>),
    Completion(ActorId),
    RunStep { step: u64, acts: Arc<Vec<u64>> },
    Stop,
    Abort,
}

enum Report {
    StepDone { step: u64 },
    Stopped { trace: Vec<TraceEvent>, usage: Vec<RegisterUsage> },
    Failed(Error),
    Blocked(Vec<Blocked>),
}

/// Told why a step was aborted, and on which device when one act's failure caused it, before the
/// driver waits for its threads: see [`Driver::on_abort`].
pub type AbortHook = Box<dyn Fn(Option<DeviceId>, &Error) + Send>;

/// A plan running on one thread per device.
pub struct Driver<P> {
    plan: Arc<Plan<P>>,
    topology: Topology,
    inbound: Inbound,
    mailboxes: Vec<Sender<Mail>>,
    reports: Receiver<Report>,
    threads: Vec<JoinHandle<()>>,
    abort: Arc<AtomicBool>,
    timeout: Option<Duration>,
    step: u64,
    dead: Option<String>,
    on_abort: Option<AbortHook>,
}

impl<P: Send + Sync + 'static> Driver<P> {
    /// Checks `plan`, starts one thread per device and makes its executor there with `executor`.
    pub fn start<E, F>(plan: Plan<P>, config: DriverConfig, executor: F) -> Result<Self, Error>
    where
        E: Executor<P> + Send + 'static,
        F: Fn(DeviceId, CompletionHandle) -> E + Send + Sync + 'static,
    {
        let devices = plan.actors.iter().map(|spec| spec.device).collect::<Vec<_>>();
        Self::start_partial(plan, config, &devices, None, executor)
    }

    /// Like [`Driver::start`], but runs only the actors of the `local` devices: messages to the
    /// others go out through `transport`, and messages from them come in through
    /// [`Driver::inbound`]. Every process of a job runs the same plan with its own devices.
    pub fn start_partial<E, F>(
        plan: Plan<P>,
        config: DriverConfig,
        local: &[DeviceId],
        transport: Option<Arc<dyn Transport>>,
        executor: F,
    ) -> Result<Self, Error>
    where
        E: Executor<P> + Send + 'static,
        F: Fn(DeviceId, CompletionHandle) -> E + Send + Sync + 'static,
    {
        let topology = plan.check()?;
        let (devices, remote) = split_devices(&plan, local);
        if !remote.is_empty() && transport.is_none() {
            let reason = format!("devices {remote:?} are remote and there is no transport");
            return Err(Error::Stopped { reason });
        }
        let route = routes(&plan, &devices, &remote);
        let (mailboxes, inboxes): (Vec<_>, Vec<_>) =
            devices.iter().map(|_| channel::unbounded()).unzip();
        let (report_sender, reports) = channel::unbounded();
        let plan = Arc::new(plan);
        let shared = Arc::new(Shared {
            route,
            mailboxes: mailboxes.clone(),
            remote,
            transport,
            executor,
            config,
            epoch: Instant::now(),
        });
        let abort = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(devices.len());
        for (thread, inbox) in inboxes.into_iter().enumerate() {
            let actors = (0..plan.actors.len())
                .filter(|&index| shared.route[index].0 == thread)
                .map(|index| Actor::new(ActorId(index as u32), &plan, &topology))
                .collect();
            let context =
                (Arc::clone(&plan), Arc::clone(&shared), Arc::clone(&abort), report_sender.clone());
            let device = devices[thread];
            let core = crate::affinity::core_for(device.0, &shared.config.cores);
            let handle = std::thread::Builder::new().name(format!("meshflow-{device}")).spawn(
                move || {
                    if let Some(core) = core {
                        crate::affinity::bind_current_thread(core);
                    }
                    Worker::run(thread, device, actors, inbox, context)
                },
            )?;
            threads.push(handle);
        }
        let inbound = Inbound { route: shared.route.clone(), mailboxes: mailboxes.clone() };
        let timeout = shared.config.step_timeout;
        Ok(Self {
            plan,
            topology,
            inbound,
            mailboxes,
            reports,
            threads,
            abort,
            timeout,
            step: 0,
            dead: None,
            on_abort: None,
        })
    }

    /// Where messages from other processes enter this one.
    pub fn inbound(&self) -> Inbound {
        self.inbound.clone()
    }

    /// Runs one step of `pieces` pieces on every thread and waits for its end.
    pub fn run_step(&mut self, pieces: u64) -> Result<(), Error> {
        if let Some(reason) = &self.dead {
            return Err(Error::Stopped { reason: reason.clone() });
        }
        let acts = Arc::new(self.plan.acts_per_step(&self.topology, pieces)?);
        self.step += 1;
        self.broadcast(|| Mail::RunStep { step: self.step, acts: Arc::clone(&acts) });
        let mut done = 0;
        while done < self.threads.len() {
            match self.receive()? {
                Report::StepDone { step } if step == self.step => done += 1,
                Report::StepDone { .. } | Report::Stopped { .. } | Report::Blocked(_) => {}
                Report::Failed(error) => return Err(self.abort_with(error)),
            }
        }
        Ok(())
    }

    /// Stops every actor, waits for the end-of-stream messages to drain, joins the threads.
    pub fn stop(mut self) -> Result<RunReport, Error> {
        if let Some(reason) = &self.dead {
            return Err(Error::Stopped { reason: reason.clone() });
        }
        self.broadcast(|| Mail::Stop);
        let mut report = RunReport::default();
        let mut stopped = 0;
        while stopped < self.threads.len() {
            match self.receive()? {
                Report::Stopped { trace, usage } => {
                    report.trace.events.extend(trace);
                    report.usage.extend(usage);
                    stopped += 1;
                }
                Report::StepDone { .. } | Report::Blocked(_) => {}
                Report::Failed(error) => return Err(self.abort_with(error)),
            }
        }
        self.join();
        report.trace.events.sort_by_key(|event| (event.start, event.actor));
        report.usage.sort_by_key(|usage| usage.actor);
        Ok(report)
    }

    fn broadcast(&self, mail: impl Fn() -> Mail) {
        for mailbox in &self.mailboxes {
            // A thread that already ended reports why through `reports`.
            let _ = mailbox.send(mail());
        }
    }

    fn receive(&mut self) -> Result<Report, Error> {
        let received = match self.timeout {
            Some(timeout) => self.reports.recv_timeout(timeout),
            None => self.reports.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(report) => Ok(report),
            Err(RecvTimeoutError::Timeout) => {
                let seconds = self.timeout.map_or(0.0, |timeout| timeout.as_secs_f64());
                Err(self.abort_with(Error::StepTimeout { seconds, blocked: Vec::new() }))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.abort_with(Error::Stopped { reason: "every thread ended".into() }))
            }
        }
    }

    /// Runs `hook` when a step is aborted (an act failed, the step timed out, a thread ended),
    /// after every thread has been told to stop and before the driver waits for them. A thread
    /// blocked outside the runtime, e.g. in a collective whose peer failed, only sees the abort
    /// when the hook wakes it; without one it waits out its own timeout.
    pub fn on_abort(&mut self, hook: impl Fn(Option<DeviceId>, &Error) + Send + 'static) {
        self.on_abort = Some(Box::new(hook));
    }

    fn abort_with(&mut self, mut error: Error) -> Error {
        self.abort.store(true, Ordering::Release);
        self.broadcast(|| Mail::Abort);
        if let Some(hook) = &self.on_abort {
            let device = match &error {
                Error::Act { actor, .. } => self.plan.actors.get(actor.index()).map(|a| a.device),
                _ => None,
            };
            hook(device, &error);
        }
        self.join();
        self.dead = Some(format!("aborted: {error}"));
        if let Error::StepTimeout { blocked, .. } = &mut error {
            for report in self.reports.try_iter() {
                if let Report::Blocked(list) = report {
                    blocked.extend(list);
                }
            }
            blocked.sort_by_key(|entry| entry.actor);
        }
        error
    }

    fn join(&mut self) {
        for thread in self.threads.drain(..) {
            // A panicking executor already ended its thread; the abort has been broadcast.
            let _ = thread.join();
        }
    }
}

impl<P> Drop for Driver<P> {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.abort.store(true, Ordering::Release);
        for mailbox in &self.mailboxes {
            let _ = mailbox.send(Mail::Abort);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Carries messages to actors of devices that another process runs (see
/// [`Driver::start_partial`]); the far side hands them to its [`Inbound`].
pub trait Transport: Send + Sync {
    /// Sends envelopes, all addressed to actors of `device`, in order.
    fn send(&self, device: DeviceId, envelopes: Vec<Envelope>) -> Result<(), Error>;
}

/// Hands messages that arrived from other processes to the threads that own their receivers.
#[derive(Clone, Debug)]
pub struct Inbound {
    route: Vec<(usize, usize)>,
    mailboxes: Vec<Sender<Mail>>,
}

impl Inbound {
    /// Delivers envelopes addressed to actors of this process, in order per receiving thread.
    pub fn deliver(&self, envelopes: Vec<Envelope>) -> Result<(), Error> {
        let mut batches: Vec<Vec<Envelope>> = vec![Vec::new(); self.mailboxes.len()];
        for envelope in envelopes {
            let thread = self.route.get(envelope.to.index()).map_or(usize::MAX, |route| route.0);
            let Some(batch) = batches.get_mut(thread) else {
                let reason =
                    format!("message for {}, which this process does not run", envelope.to);
                return Err(Error::Protocol { actor: envelope.to, reason });
            };
            batch.push(envelope);
        }
        for (thread, batch) in
            batches.into_iter().enumerate().filter(|(_, batch)| !batch.is_empty())
        {
            self.mailboxes[thread].send(Mail::Batch(batch)).map_err(|_| Error::Stopped {
                reason: format!("message for a thread of this process after it ended ({thread})"),
            })?;
        }
        Ok(())
    }
}

/// The local devices (that have actors) and the remote ones, each sorted.
fn split_devices<P>(plan: &Plan<P>, local: &[DeviceId]) -> (Vec<DeviceId>, Vec<DeviceId>) {
    let mut devices: Vec<DeviceId> = plan.actors.iter().map(|spec| spec.device).collect();
    devices.sort();
    devices.dedup();
    devices.into_iter().partition(|device| local.contains(device))
}

/// Per actor: its thread and its index there, or (thread count + remote index, 0) when remote.
fn routes<P>(plan: &Plan<P>, devices: &[DeviceId], remote: &[DeviceId]) -> Vec<(usize, usize)> {
    let mut counts = vec![0usize; devices.len()];
    let route = |spec: &crate::ActorSpec<P>| match devices.binary_search(&spec.device) {
        Ok(thread) => {
            counts[thread] += 1;
            (thread, counts[thread] - 1)
        }
        Err(_) => {
            let index = remote.binary_search(&spec.device).expect("a device is local or remote");
            (devices.len() + index, 0)
        }
    };
    plan.actors.iter().map(route).collect()
}

struct Shared<F> {
    route: Vec<(usize, usize)>,
    mailboxes: Vec<Sender<Mail>>,
    remote: Vec<DeviceId>,
    transport: Option<Arc<dyn Transport>>,
    executor: F,
    config: DriverConfig,
    /// What every thread's trace times count from, so that acts on different threads compare.
    epoch: Instant,
}

/// Mailbox polls (about a microsecond) between two yields, and reads of the clock, while a thread
/// spins.
const POLLS_PER_YIELD: u32 = 16;

type Context<P, F> = (Arc<Plan<P>>, Arc<Shared<F>>, Arc<AtomicBool>, Sender<Report>);

struct Worker<P, E, F> {
    thread: usize,
    device: DeviceId,
    plan: Arc<Plan<P>>,
    shared: Arc<Shared<F>>,
    abort: Arc<AtomicBool>,
    reports: Sender<Report>,
    inbox: Receiver<Mail>,
    actors: Vec<Actor>,
    executor: E,
    local: VecDeque<Envelope>,
    outboxes: Vec<Vec<Envelope>>,
    steps: HashMap<u64, usize>,
    stopping: bool,
    trace: Option<Vec<TraceEvent>>,
    act_started: Vec<u64>,
}

impl<P, E, F> Worker<P, E, F>
where
    P: Send + Sync,
    E: Executor<P> + Send,
    F: Fn(DeviceId, CompletionHandle) -> E + Send + Sync,
{
    fn run(
        thread: usize,
        device: DeviceId,
        actors: Vec<Actor>,
        inbox: Receiver<Mail>,
        context: Context<P, F>,
    ) {
        let (abort, reports) = (Arc::clone(&context.2), context.3.clone());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let worker = Self::new(thread, device, actors, inbox, context);
            let Some(enclose) = worker.executor.enclosure() else { return worker.serve_all() };
            let (mut worker, mut outcome) = (Some(worker), Ok(()));
            enclose(&mut || {
                if let Some(worker) = worker.take() {
                    outcome = worker.serve_all();
                }
            });
            outcome
        }));
        let error = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(panic) => {
                let message = panic_message(&*panic);
                Error::Stopped { reason: format!("the thread of {device} panicked: {message}") }
            }
        };
        abort.store(true, Ordering::Release);
        let _ = reports.send(Report::Failed(error));
    }

    fn new(
        thread: usize,
        device: DeviceId,
        actors: Vec<Actor>,
        inbox: Receiver<Mail>,
        context: Context<P, F>,
    ) -> Self {
        let (plan, shared, abort, reports) = context;
        let handle = CompletionHandle { mailbox: shared.mailboxes[thread].clone() };
        let executor = (shared.executor)(device, handle);
        let trace = shared.config.trace.then(Vec::new);
        Worker {
            thread,
            device,
            outboxes: vec![Vec::new(); shared.mailboxes.len() + shared.remote.len()],
            act_started: vec![0; actors.len()],
            plan,
            shared,
            abort,
            reports,
            inbox,
            actors,
            executor,
            local: VecDeque::new(),
            steps: HashMap::new(),
            stopping: false,
            trace,
        }
    }

    fn serve_all(mut self) -> Result<(), Error> {
        self.start()?;
        self.serve()
    }

    fn start(&mut self) -> Result<(), Error> {
        for actor in &mut self.actors {
            actor.handle_message(Message::Command(Command::Start))?;
        }
        Ok(())
    }

    fn serve(&mut self) -> Result<(), Error> {
        loop {
            self.drain_local()?;
            self.flush()?;
            if self.stopping && self.actors.iter().all(Actor::is_stopped) {
                let trace = self.trace.take().unwrap_or_default();
                let usage = self.actors.iter().map(Actor::usage).collect();
                let _ = self.reports.send(Report::Stopped { trace, usage });
                return Ok(());
            }
            match self.next_mail() {
                Some(Mail::Batch(envelopes)) => self.local.extend(envelopes),
                Some(Mail::Completion(actor)) => self.complete(actor)?,
                Some(Mail::RunStep { step, acts }) => {
                    self.command_all(|actor| Command::RunStep { step, acts: acts[actor.index()] })
                }
                Some(Mail::Stop) => {
                    self.stopping = true;
                    self.command_all(|_| Command::Stop);
                }
                Some(Mail::Abort) | None => {
                    let blocked =
                        self.actors.iter().filter_map(|actor| actor.blocked(&self.plan)).collect();
                    let _ = self.reports.send(Report::Blocked(blocked));
                    return Ok(());
                }
            }
        }
    }

    fn next_mail(&self) -> Option<Mail> {
        match self.spin() {
            Ok(mail) => Some(mail),
            Err(TryRecvError::Disconnected) => None,
            Err(TryRecvError::Empty) => self.inbox.recv().ok(),
        }
    }

    /// Polls the mailbox until mail comes or the spin budget is spent (`Empty`), with a spin hint
    /// between polls and a yield after every few; an abort ends the spin as a disconnection
    /// would.
    fn spin(&self) -> Result<Mail, TryRecvError> {
        let budget = self.shared.config.spin;
        let begin = Instant::now();
        loop {
            for _ in 0..POLLS_PER_YIELD {
                match self.inbox.try_recv() {
                    Err(TryRecvError::Empty) => std::hint::spin_loop(),
                    outcome => return outcome,
                }
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(TryRecvError::Disconnected);
            }
            if begin.elapsed() >= budget {
                return Err(TryRecvError::Empty);
            }
            // Gives the core to the peer thread if it waits on this one's core; returns at once
            // when nothing else is runnable here.
            std::thread::yield_now();
        }
    }

    fn command_all(&mut self, command: impl Fn(ActorId) -> Command) {
        for actor in &self.actors {
            let id = actor.id();
            self.local.push_back(Envelope {
                from: id,
                to: id,
                message: Message::Command(command(id)),
            });
        }
    }

    fn drain_local(&mut self) -> Result<(), Error> {
        while let Some(envelope) = self.local.pop_front() {
            let local = self.shared.route[envelope.to.index()].1;
            self.actors[local].handle_message(envelope.message)?;
            self.drive(local)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        (0..self.outboxes.len()).try_for_each(|index| self.flush_outbox(index))
    }

    /// Sends what waits for thread `index` (or a remote device, through the transport).
    fn flush_outbox(&mut self, index: usize) -> Result<(), Error> {
        if self.outboxes[index].is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.outboxes[index]);
        let threads = self.shared.mailboxes.len();
        match (self.shared.mailboxes.get(index), &self.shared.transport) {
            // A thread that already ended reports why; its messages no longer matter.
            (Some(mailbox), _) => drop(mailbox.send(Mail::Batch(batch))),
            (None, Some(transport)) => {
                transport.send(self.shared.remote[index - threads], batch)?
            }
            (None, None) => unreachable!("remote devices exist only with a transport"),
        }
        Ok(())
    }

    fn drive(&mut self, local: usize) -> Result<(), Error> {
        while let Some(action) = self.actors[local].poll_action() {
            match action {
                Action::Send(envelope) => self.route(envelope)?,
                Action::StepDone { step } => self.step_done(step),
                Action::Act(start) => {
                    if !self.act(local, start)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn route(&mut self, envelope: Envelope) -> Result<(), Error> {
        let thread = self.shared.route[envelope.to.index()].0;
        if thread == self.thread {
            self.local.push_back(envelope);
            return Ok(());
        }
        self.outboxes[thread].push(envelope);
        match self.shared.config.batch {
            true => Ok(()),
            false => self.flush_outbox(thread),
        }
    }

    fn step_done(&mut self, step: u64) {
        let done = self.steps.entry(step).or_insert(0);
        *done += 1;
        if *done == self.actors.len() {
            self.steps.remove(&step);
            let _ = self.reports.send(Report::StepDone { step });
        }
    }

    /// Runs an act; returns whether it completed synchronously.
    fn act(&mut self, local: usize, start: ActStart) -> Result<bool, Error> {
        let begin = self.clock();
        let completion = run_act(&mut self.executor, &self.plan, &self.actors[local], start)?;
        self.act_started[local] = begin;
        match completion {
            Completion::Done => self.finish(local).map(|()| true),
            Completion::Pending => Ok(false),
        }
    }

    fn complete(&mut self, actor: ActorId) -> Result<(), Error> {
        let local = self.shared.route[actor.index()].1;
        self.finish(local)?;
        self.drive(local)
    }

    fn finish(&mut self, local: usize) -> Result<(), Error> {
        let actor = &mut self.actors[local];
        actor.handle_completion()?;
        if self.trace.is_some() {
            let event = TraceEvent {
                actor: actor.id(),
                device: self.device,
                sequence: actor.completed() - 1,
                start: self.act_started[local],
                end: self.clock(),
            };
            self.trace.get_or_insert_with(Vec::new).push(event);
        }
        Ok(())
    }

    fn clock(&self) -> u64 {
        match self.trace {
            Some(_) => self.shared.epoch.elapsed().as_nanos() as u64,
            None => 0,
        }
    }
}

/// The message a panic carried (its `&str` or `String` payload; empty for any other).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_string(),
        (None, Some(text)) => text.clone(),
        (None, None) => String::new(),
    }
}
