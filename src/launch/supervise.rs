//! Starting, watching and stopping the workers of one node.
//!
//! Each worker runs in its own process group, so a terminal's Ctrl-C reaches it once, through the
//! launcher, which forwards SIGINT and SIGTERM to every group. When a worker fails, the launcher
//! first calls the failure hook (which tells the rendezvous, so that other nodes name the right
//! rank), then stops the other workers: SIGTERM (with SIGCONT, so that a stopped one can act on it),
//! and SIGKILL for those still alive after the stop grace.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::output::{self, Stream, Tail};
use super::plan::NodePlan;

/// Everything the supervisor needs besides the plan.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    /// The worker program and its arguments.
    pub command: Vec<OsString>,
    /// How long stopped workers get between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// How many times the whole group is restarted after a failure.
    pub max_restarts: u32,
    /// Where each rank's output is also written (`rank<N>.log`), if anywhere.
    pub log_dir: Option<PathBuf>,
    /// The job secret file whose path the workers get in `MESHFLOW_SECRET_FILE`.
    pub secret_file: PathBuf,
}

/// How one worker ended.
#[derive(Debug, Clone)]
pub struct WorkerFailure {
    /// Its global rank.
    pub rank: usize,
    /// Its process id.
    pub pid: u32,
    /// Its exit status.
    pub status: ExitStatus,
    /// The last lines it printed.
    pub last_lines: Vec<String>,
}

/// How a run of the launcher ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every worker exited with status 0.
    Success,
    /// A worker failed (after the last allowed restart).
    Failed {
        /// The first worker that failed.
        failure: WorkerFailure,
        /// Ranks that were stopped (SIGSTOP) when the failure was seen: they had stopped answering.
        frozen: Vec<usize>,
        /// How long stopping the others took.
        stop_time: Duration,
    },
    /// The launcher received SIGINT or SIGTERM and passed it on.
    Interrupted {
        /// The signal number.
        signal: i32,
    },
}

/// Called (on a blocking thread) with a failed worker before the others are stopped; best effort,
/// and the hook bounds its own time.
pub type FailureHook = Arc<dyn Fn(&WorkerFailure) + Send + Sync>;

/// One running worker.
struct Worker {
    rank: usize,
    pid: u32,
    tail: Tail,
    running: bool,
    forwarders: Vec<JoinHandle<()>>,
}

/// Runs the group, restarting it up to `max_restarts` times.
pub async fn supervise(
    plan: &NodePlan,
    options: &SuperviseOptions,
    on_failure: FailureHook,
) -> std::io::Result<Outcome> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut attempt = 0;
    loop {
        let (exits_sender, mut exits) = mpsc::unbounded_channel();
        let mut workers = spawn_group(plan, options, attempt, &exits_sender)?;
        drop(exits_sender);
        let event = tokio::select! {
            event = watch(&mut workers, &mut exits) => event,
            _ = interrupt.recv() => Event::Signal(Signal::INT),
            _ = terminate.recv() => Event::Signal(Signal::TERM),
        };
        match event {
            Event::AllSucceeded => return Ok(Outcome::Success),
            Event::Signal(signal) => {
                signal_all(&workers, signal);
                stop_group(&mut workers, &mut exits, options.stop_grace).await;
                return Ok(Outcome::Interrupted { signal: signal.as_raw() });
            }
            Event::Failed(index, status) => {
                let frozen = frozen_ranks(&workers);
                drain_output(&mut workers[index]).await;
                let failure = describe(&workers[index], status);
                let hook = (on_failure.clone(), failure.clone());
                let _ = tokio::task::spawn_blocking(move || (hook.0)(&hook.1)).await;
                let started = Instant::now();
                stop_group(&mut workers, &mut exits, options.stop_grace).await;
                let stop_time = started.elapsed();
                if attempt >= options.max_restarts {
                    return Ok(Outcome::Failed { failure, frozen, stop_time });
                }
                attempt += 1;
                eprintln!(
                    "meshflow launch: rank {} failed ({}); restarting the group ({attempt} of {})",
                    failure.rank,
                    describe_status(failure.status),
                    options.max_restarts
                );
            }
        }
    }
}

enum Event {
    AllSucceeded,
    Failed(usize, ExitStatus),
    Signal(Signal),
}

type Exits = mpsc::UnboundedReceiver<(usize, ExitStatus)>;

async fn watch(workers: &mut [Worker], exits: &mut Exits) -> Event {
    while let Some((index, status)) = exits.recv().await {
        workers[index].running = false;
        if !status.success() {
            return Event::Failed(index, status);
        }
        if workers.iter().all(|worker| !worker.running) {
            for worker in workers.iter_mut() {
                drain_output(worker).await;
            }
            return Event::AllSucceeded;
        }
    }
    Event::AllSucceeded
}

fn spawn_group(
    plan: &NodePlan,
    options: &SuperviseOptions,
    attempt: u32,
    exits: &mpsc::UnboundedSender<(usize, ExitStatus)>,
) -> std::io::Result<Vec<Worker>> {
    (0..plan.nproc_per_node)
        .map(|index| spawn_worker(plan, options, attempt, index, exits.clone()))
        .collect()
}

fn spawn_worker(
    plan: &NodePlan,
    options: &SuperviseOptions,
    attempt: u32,
    index: usize,
    exits: mpsc::UnboundedSender<(usize, ExitStatus)>,
) -> std::io::Result<Worker> {
    let rank = plan.rank(index);
    let (program, arguments) = options
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("no worker program given"))?;
    let mut command = Command::new(program);
    command
        .args(arguments)
        .envs(worker_environment(plan, index, attempt))
        .env("MESHFLOW_SECRET_FILE", &options.secret_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // The log first: a log directory that cannot be written fails before the worker starts.
    let log = open_log(options.log_dir.as_deref(), rank)?;
    let mut child = command.spawn().map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("cannot start {program:?} for rank {rank}: {error}"),
        )
    })?;
    let pid = child.id().unwrap_or(0);
    let tail = Tail::default();
    let mut forwarders = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        forwarders.push(output::forward(stdout, rank, Stream::Out, tail.clone(), log.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        forwarders.push(output::forward(stderr, rank, Stream::Err, tail.clone(), log));
    }
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            let _ = exits.send((index, status));
        }
    });
    Ok(Worker { rank, pid, tail, running: true, forwarders })
}

/// torchrun's variables for the `index`-th worker of this node.
pub fn worker_environment(plan: &NodePlan, index: usize, attempt: u32) -> Vec<(String, String)> {
    vec![
        ("MASTER_ADDR".into(), plan.master_addr.clone()),
        ("MASTER_PORT".into(), plan.master_port.to_string()),
        ("WORLD_SIZE".into(), plan.world_size().to_string()),
        ("RANK".into(), plan.rank(index).to_string()),
        ("LOCAL_RANK".into(), (plan.local_rank_offset + index).to_string()),
        ("LOCAL_WORLD_SIZE".into(), plan.local_world_size.to_string()),
        ("GROUP_RANK".into(), plan.node_rank.to_string()),
        ("MESHFLOW_RESTART_COUNT".into(), attempt.to_string()),
    ]
}

fn open_log(log_dir: Option<&Path>, rank: usize) -> std::io::Result<Option<output::LogFile>> {
    let Some(directory) = log_dir else {
        return Ok(None);
    };
    let named = |path: &Path| {
        let path = path.to_path_buf();
        move |error: std::io::Error| {
            std::io::Error::new(error.kind(), format!("--log-dir {}: {error}", path.display()))
        }
    };
    std::fs::create_dir_all(directory).map_err(named(directory))?;
    let path = directory.join(format!("rank{rank}.log"));
    let file: File =
        OpenOptions::new().create(true).append(true).open(&path).map_err(named(&path))?;
    Ok(Some(Arc::new(Mutex::new(file))))
}

fn signal_all(workers: &[Worker], signal: Signal) {
    for worker in workers.iter().filter(|worker| worker.running) {
        signal_group(worker.pid, signal);
    }
}

/// Sends `signal` to the process group led by `pid` (a child started with `process_group(0)`).
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    // The group may be gone already; that is the outcome we want.
    let _ = kill_process_group(pid, signal);
}

/// Stops every running worker: SIGTERM and SIGCONT, then SIGKILL after `grace`.
async fn stop_group(workers: &mut [Worker], exits: &mut Exits, grace: Duration) {
    for signal in [Signal::TERM, Signal::CONT] {
        signal_all(workers, signal);
    }
    let deadline = tokio::time::Instant::now() + grace;
    if !wait_all(workers, exits, Some(deadline)).await {
        signal_all(workers, Signal::KILL);
        wait_all(workers, exits, None).await;
    }
    for worker in workers.iter_mut() {
        drain_output(worker).await;
    }
}

/// Waits until every worker has exited (true) or the deadline passes (false).
async fn wait_all(
    workers: &mut [Worker],
    exits: &mut Exits,
    deadline: Option<tokio::time::Instant>,
) -> bool {
    while workers.iter().any(|worker| worker.running) {
        let next = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, exits.recv()).await {
                Ok(next) => next,
                Err(_) => return false,
            },
            None => exits.recv().await,
        };
        match next {
            Some((index, _)) => workers[index].running = false,
            None => return true,
        }
    }
    true
}

/// Lets the output forwarders finish (bounded: a grandchild may hold the pipe open).
async fn drain_output(worker: &mut Worker) {
    for forwarder in worker.forwarders.drain(..) {
        let _ = tokio::time::timeout(Duration::from_millis(500), forwarder).await;
    }
}

fn describe(worker: &Worker, status: ExitStatus) -> WorkerFailure {
    WorkerFailure { rank: worker.rank, pid: worker.pid, status, last_lines: worker.tail.lines() }
}

/// Ranks whose process is stopped (state `T` in `/proc/<pid>/stat`).
fn frozen_ranks(workers: &[Worker]) -> Vec<usize> {
    workers
        .iter()
        .filter(|worker| worker.running && is_stopped(worker.pid))
        .map(|worker| worker.rank)
        .collect()
}

fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    matches!(state.and_then(|rest| rest.chars().next()), Some('T'))
}

/// "exit status 3" or "signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(number)) => format!("signal {number} ({})", signal_name(number)),
        (None, None) => format!("{status}"),
    }
}

fn signal_name(number: i32) -> &'static str {
    match number {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}
