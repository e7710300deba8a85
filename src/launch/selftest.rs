//! `meshflow selftest`: a tiny worker that checks a world formed by `meshflow launch`, srun or
//! mpirun. Every rank joins, then runs `--rounds` rounds of a key-value all-gather (each rank
//! stores `rank + 1 + round`, reads every rank's value and checks the sum) closed by a barrier,
//! and prints one line per round. With `--collectives` each round is instead an all-reduce of
//! `rank + 1 + round` and an all-gather of the ranks over the health-watched data plane
//! ([`Job::communicator`]). On any error it prints the error with the wall-clock time in
//! milliseconds (so that tests can measure failure-detection latency) and exits with status 1.
//!
//! ```text
//! meshflow launch --nproc-per-node 4 -- meshflow selftest --rounds 3
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use meshflow_comm::cluster::{ClusterConfig, Health};
use meshflow_comm::{Communicator, ReduceOp};
use tokio::signal::unix::{signal, SignalKind};

use crate::dist::{self, DistError, Job, JoinOptions};

/// Why the self-test failed.
#[derive(Debug, thiserror::Error)]
enum SelftestError {
    /// Joining or a store operation failed (a peer failure among them).
    #[error(transparent)]
    Dist(#[from] DistError),
    /// A rank stored something else than the protocol says.
    #[error("check failed: {0}")]
    Mismatch(String),
    /// The data plane or a collective failed.
    #[error(transparent)]
    Comm(#[from] meshflow_comm::Error),
    /// A tensor could not be made or read.
    #[error(transparent)]
    Tensor(#[from] crate::ops::Error),
}

/// The flags of `meshflow selftest`.
#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// Rounds of all-gather + barrier.
    #[arg(long, default_value_t = 1)]
    pub rounds: u64,
    /// Pause between rounds, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub pause_ms: u64,
    /// Heartbeat interval, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Silence after which a peer is declared failed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub failure_timeout_ms: u64,
    /// How long every rank has to join, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub join_timeout_ms: u64,
    /// After the rounds, connect the data plane (QUIC mesh over the announced addresses) and
    /// run one all-reduce and one all-gather with the comm collectives.
    #[arg(long)]
    pub all_reduce: bool,
    /// Run every round as comm collectives (all-reduce and all-gather over the health-watched
    /// data plane) instead of through the rendezvous store.
    #[arg(long)]
    pub collectives: bool,
}

/// Runs the self-test; the exit code says whether every round passed.
pub fn run(args: &SelftestArgs) -> ExitCode {
    let reporter = Arc::new(Reporter::default());
    let code = match check(args, &reporter) {
        Ok(sum) => {
            println!("selftest: ok, {} rounds, last sum {sum}", args.rounds);
            ExitCode::SUCCESS
        }
        Err(error) => {
            reporter.fail(&error);
            ExitCode::FAILURE
        }
    };
    reporter.finish();
    code
}

fn check(args: &SelftestArgs, reporter: &Arc<Reporter>) -> Result<u64, SelftestError> {
    let world = dist::init()?;
    let options = JoinOptions {
        cluster: ClusterConfig {
            join_timeout: Duration::from_millis(args.join_timeout_ms),
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms.max(1)),
            failure_timeout: Duration::from_millis(args.failure_timeout_ms),
        },
        ..JoinOptions::default()
    };
    let job = world.join(&options)?;
    reporter.watch(job.health(), world.rank);
    println!(
        "selftest: joined as rank {} of {} (local rank {}), {} members, pid {}",
        world.rank,
        world.world_size,
        world.local_rank,
        job.members().len(),
        std::process::id()
    );
    let sum = rounds(&job, args, reporter)?;
    job.finish()?;
    Ok(sum)
}

/// The rounds on a communicator over every rank. A failure is printed here, while the
/// communicator and the job still live: their teardown waits (bounded) on peers that may be gone
/// (outgoing streams to be acknowledged; rank 0 lingers to deliver a failure), which can outlast
/// the second a SIGTERM from the launcher leaves this process. Printed after the teardown, the
/// line could be lost: in a CI run a survivor of a kill -9 printed its detection but not its
/// error, and its launcher needed the whole second to stop it. A data plane that fails to
/// connect (a peer gone before the rounds) is reported here too, before the job's teardown.
fn rounds(job: &Job, args: &SelftestArgs, reporter: &Reporter) -> Result<u64, SelftestError> {
    let everyone: Vec<usize> = (0..job.world().world_size).collect();
    let data_plane = args.collectives || args.all_reduce;
    let mut communicator = None;
    let mut connect_and_run = || {
        if data_plane {
            communicator = Some(job.communicator(&everyone)?);
        }
        run_rounds(job, args, &mut communicator)
    };
    let result = connect_and_run();
    if let Err(error) = &result {
        reporter.fail(error);
    }
    result
}

fn run_rounds(
    job: &Job,
    args: &SelftestArgs,
    communicator: &mut Option<Box<dyn Communicator>>,
) -> Result<u64, SelftestError> {
    let mut sum = 0;
    for round in 0..args.rounds {
        sum = match communicator.as_mut().filter(|_| args.collectives) {
            Some(communicator) => collective_round(communicator.as_mut(), job, round)?,
            None => all_gather_round(job, round)?,
        };
        println!("selftest: round {round} sum {sum}");
        std::thread::sleep(Duration::from_millis(args.pause_ms));
    }
    if let Some(communicator) = communicator.as_mut().filter(|_| args.all_reduce) {
        all_reduce(communicator.as_mut(), job)?;
        parity_all_reduce(job)?;
    }
    if communicator.is_some() {
        // Every rank must be done with the data plane before any closes its endpoint.
        job.barrier("selftest/data-plane")?;
    }
    Ok(sum)
}

/// `n (n + 1) / 2 + n round`: the sum of every rank's `rank + 1 + round`.
fn expected_sum(world_size: usize, round: u64) -> u64 {
    let size = world_size as u64;
    size * (size + 1) / 2 + size * round
}

/// One round over the data plane: an all-reduce of `[rank + 1 + round; 256]` and an all-gather
/// of `[rank; 2]`, both checked.
fn collective_round(
    communicator: &mut dyn Communicator,
    job: &Job,
    round: u64,
) -> Result<u64, SelftestError> {
    let world = job.world();
    let mine = (world.rank as u64 + 1 + round) as f32;
    let input = crate::ops::Tensor::from_vec(vec![mine; 256], vec![256])?;
    let reduced: Vec<f32> = communicator.all_reduce(&input, ReduceOp::Sum)?.to_vec()?;
    let expected = expected_sum(world.world_size, round);
    if reduced.iter().any(|&value| value != expected as f32) {
        return Err(SelftestError::Mismatch(format!(
            "round {round}: all-reduce gave {:?}…, expected {expected}",
            &reduced[..4]
        )));
    }
    let ranks = crate::ops::Tensor::from_vec(vec![world.rank as f32; 2], vec![2])?;
    let gathered: Vec<f32> = communicator.all_gather(&ranks)?.to_vec()?;
    let expected_ranks: Vec<f32> =
        (0..world.world_size).flat_map(|rank| [rank as f32; 2]).collect();
    if gathered != expected_ranks {
        return Err(SelftestError::Mismatch(format!(
            "round {round}: all-gather gave {gathered:?}, expected {expected_ranks:?}"
        )));
    }
    Ok(expected)
}

/// One all-reduce of `[rank + 1; 4]` over the QUIC data plane, checked against `n (n + 1) / 2`,
/// and one all-gather of `[rank]`, checked against `0..n`.
fn all_reduce(communicator: &mut dyn Communicator, job: &Job) -> Result<(), SelftestError> {
    let world = job.world();
    let input = crate::ops::Tensor::from_vec(vec![world.rank as f32 + 1.0; 4], vec![4])?;
    let output: Vec<f32> = communicator.all_reduce(&input, ReduceOp::Sum)?.to_vec()?;
    let expected = expected_sum(world.world_size, 0) as f32;
    if output.iter().any(|&value| value != expected) {
        return Err(SelftestError::Mismatch(format!(
            "all-reduce gave {output:?}, expected {expected}"
        )));
    }
    println!("selftest: all-reduce over QUIC ok: {expected}");
    let rank = crate::ops::Tensor::from_vec(vec![world.rank as f32], vec![1])?;
    let gathered: Vec<f32> = communicator.all_gather(&rank)?.to_vec()?;
    let expected: Vec<f32> = (0..world.world_size).map(|rank| rank as f32).collect();
    if gathered != expected {
        return Err(SelftestError::Mismatch(format!(
            "all-gather gave {gathered:?}, expected {expected:?}"
        )));
    }
    println!("selftest: all-gather over QUIC ok: {gathered:?}");
    Ok(())
}

/// One all-reduce of `rank + 1` over the group of the ranks with this rank's parity (a group
/// that is not the world), checked against the sum of its members' values.
fn parity_all_reduce(job: &Job) -> Result<(), SelftestError> {
    let world = job.world();
    let group: Vec<usize> =
        (0..world.world_size).filter(|rank| rank % 2 == world.rank % 2).collect();
    let mut communicator = job.communicator(&group)?;
    let input = crate::ops::Tensor::from_vec(vec![world.rank as f32 + 1.0], vec![1])?;
    let output: Vec<f32> = communicator.all_reduce(&input, ReduceOp::Sum)?.to_vec()?;
    let expected: f32 = group.iter().map(|&rank| rank as f32 + 1.0).sum();
    if output != [expected] {
        return Err(SelftestError::Mismatch(format!(
            "all-reduce over group {group:?} gave {output:?}, expected {expected}"
        )));
    }
    println!("selftest: group {group:?} all-reduce ok: {expected}");
    Ok(())
}

/// One all-gather through the store, checked against the closed form, then a barrier.
fn all_gather_round(job: &Job, round: u64) -> Result<u64, SelftestError> {
    let world = job.world();
    let mine = world.rank as u64 + 1 + round;
    job.set(&format!("selftest/{round}/{}", world.rank), &mine.to_le_bytes())?;
    let mut sum = 0;
    for rank in 0..world.world_size {
        let bytes = job.get(&format!("selftest/{round}/{rank}"))?;
        let value = <[u8; 8]>::try_from(bytes.as_slice()).map(u64::from_le_bytes);
        sum += value.map_err(|_| {
            SelftestError::Mismatch(format!("rank {rank} stored {} bytes, not 8", bytes.len()))
        })?;
    }
    let expected = expected_sum(world.world_size, round);
    if sum != expected {
        return Err(SelftestError::Mismatch(format!(
            "round {round}: sum {sum}, expected {expected}"
        )));
    }
    job.barrier(&format!("selftest/{round}"))?;
    Ok(sum)
}

/// Prints, once, when this process learned of a peer failure, and lets a SIGTERM from the
/// launcher wait until the main thread has printed its error.
struct Reporter {
    watched: OnceLock<(Health, usize)>,
    printed: Once,
    /// The error line is out.
    failed: Once,
    finished: Mutex<bool>,
    finished_changed: Condvar,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter {
            watched: OnceLock::new(),
            printed: Once::new(),
            failed: Once::new(),
            finished: Mutex::new(false),
            finished_changed: Condvar::new(),
        }
    }
}

impl Reporter {
    /// Starts watching the job's health (from a thread of its own, so that a rank that is
    /// sleeping or computing reports the failure too).
    fn watch(self: &Arc<Self>, health: Health, rank: usize) {
        if self.watched.set((health, rank)).is_ok() {
            watch_health(self.clone());
        }
    }

    /// Prints the detection line if a failure is known and the line is not out yet; a second
    /// caller waits until the first has printed, so that the process does not exit before.
    fn print_detection(&self) {
        let Some((health, rank)) = self.watched.get() else {
            return;
        };
        let Some(failure) = health.failure() else {
            return;
        };
        self.printed.call_once(|| {
            let age = health.failed_at().map(|at| at.elapsed().as_millis()).unwrap_or(0);
            println!(
                "selftest: rank {rank} detected at {} ms: peer rank {} failed: {}",
                now_ms() - age,
                failure.rank,
                failure.reason
            );
        });
    }

    /// Prints, once, the detection (if any) and then the error line with the time it is
    /// printed, and marks the main thread's last line as out. The rank is the joined one, or
    /// `RANK` from the launcher when the job was not joined.
    fn fail(&self, error: &SelftestError) {
        self.failed.call_once(|| {
            let rank = match self.watched.get() {
                Some((_, rank)) => rank.to_string(),
                None => std::env::var("RANK").unwrap_or_else(|_| "?".to_string()),
            };
            self.print_detection();
            println!("selftest: rank {rank} error at {} ms: {error}", now_ms());
        });
        self.finish();
    }

    /// The main thread has printed its last line.
    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.finished_changed.notify_all();
    }

    /// Waits (at most `limit`) until the main thread has printed its last line.
    fn wait_finished(&self, limit: Duration) {
        let finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self
            .finished_changed
            .wait_timeout_while(finished, limit, |finished| !*finished)
            .map_err(PoisonError::into_inner);
    }
}

/// Prints the moment this process learns of a failure; on SIGTERM from the launcher waits up to
/// a second for the failure to arrive and up to another for the main thread's error line, so
/// that neither is lost, then exits.
fn watch_health(reporter: Arc<Reporter>) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let (Ok(runtime), Some((health, _))) = (runtime, reporter.watched.get()) else {
            return;
        };
        let health = health.clone();
        runtime.block_on(async move {
            let Ok(mut terminate) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = health.failed() => reporter.print_detection(),
                _ = terminate.recv() => {
                    let failed = health.failed();
                    if tokio::time::timeout(Duration::from_secs(1), failed).await.is_ok() {
                        reporter.print_detection();
                    }
                    reporter.wait_finished(Duration::from_secs(1));
                    std::process::exit(143);
                }
            }
            terminate.recv().await;
            reporter.wait_finished(Duration::from_secs(1));
            std::process::exit(143);
        });
    });
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0)
}
