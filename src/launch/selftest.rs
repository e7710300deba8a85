//! `meshflow selftest`: a tiny worker that checks a world formed by `meshflow launch`, srun or
//! mpirun. Every rank joins, then runs `--rounds` rounds of a key-value all-gather (each rank
//! stores `rank + 1 + round`, reads every rank's value and checks the sum) closed by a barrier,
//! and prints one line per round. On any error it prints the error with the wall-clock time in
//! milliseconds (so that tests can measure failure-detection latency) and exits with status 1.
//!
//! ```text
//! meshflow launch --nproc-per-node 4 -- meshflow selftest --rounds 3
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use meshflow_comm::cluster::{ClusterConfig, Health};
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
    /// run one all-reduce with the comm collectives.
    #[arg(long)]
    pub all_reduce: bool,
}

/// Runs the self-test; the exit code says whether every round passed.
pub fn run(args: &SelftestArgs) -> ExitCode {
    let rank = std::env::var("RANK").unwrap_or_else(|_| "?".to_string());
    match check(args) {
        Ok(sum) => {
            println!("selftest: ok, {} rounds, last sum {sum}", args.rounds);
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("selftest: rank {rank} error at {} ms: {error}", now_ms());
            ExitCode::FAILURE
        }
    }
}

fn check(args: &SelftestArgs) -> Result<u64, SelftestError> {
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
    let detection =
        Arc::new(Detection { health: job.health(), rank: world.rank, printed: Once::new() });
    watch_health(detection.clone());
    println!(
        "selftest: joined as rank {} of {} (local rank {}), {} members, pid {}",
        world.rank,
        world.world_size,
        world.local_rank,
        job.members().len(),
        std::process::id()
    );
    let result = rounds(&job, args);
    if result.is_err() {
        detection.print();
    }
    let sum = result?;
    job.finish()?;
    Ok(sum)
}

fn rounds(job: &Job, args: &SelftestArgs) -> Result<u64, SelftestError> {
    let mut sum = 0;
    for round in 0..args.rounds {
        sum = all_gather_round(job, round)?;
        println!("selftest: round {round} sum {sum}");
        std::thread::sleep(Duration::from_millis(args.pause_ms));
    }
    if args.all_reduce {
        all_reduce(job)?;
    }
    Ok(sum)
}

/// One all-reduce of `[rank + 1; 4]` over the QUIC data plane, checked against `n (n + 1) / 2`.
fn all_reduce(job: &Job) -> Result<(), SelftestError> {
    use meshflow_comm::quic::QuicTransport;
    use meshflow_comm::{Communicator, ReduceOp, TransportCommunicator};

    let world = job.world();
    let addresses = job.data_addresses()?;
    let transport = QuicTransport::connect_mesh(job.data_endpoint().clone(), &addresses)?;
    let mut communicator = TransportCommunicator::world(Arc::new(transport))?;
    let input = crate::ops::Tensor::from_vec(vec![world.rank as f32 + 1.0; 4], vec![4])?;
    let output: Vec<f32> = communicator.all_reduce(&input, ReduceOp::Sum)?.to_vec()?;
    let size = world.world_size as f32;
    let expected = size * (size + 1.0) / 2.0;
    if output.iter().any(|&value| value != expected) {
        return Err(SelftestError::Mismatch(format!(
            "all-reduce gave {output:?}, expected {expected}"
        )));
    }
    println!("selftest: all-reduce over QUIC ok: {expected}");
    // Every rank must be done with the data plane before any closes its endpoint.
    job.barrier("selftest/all-reduce")?;
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
    let size = world.world_size as u64;
    let expected = size * (size + 1) / 2 + size * round;
    if sum != expected {
        return Err(SelftestError::Mismatch(format!(
            "round {round}: sum {sum}, expected {expected}"
        )));
    }
    job.barrier(&format!("selftest/{round}"))?;
    Ok(sum)
}

/// Prints, once, when this process learned of a peer failure.
struct Detection {
    health: Health,
    rank: usize,
    printed: Once,
}

impl Detection {
    /// Prints the detection line if a failure is known and the line is not out yet; a second
    /// caller waits until the first has printed, so that the process does not exit before.
    fn print(&self) {
        let Some(failure) = self.health.failure() else {
            return;
        };
        self.printed.call_once(|| {
            let age = self.health.failed_at().map(|at| at.elapsed().as_millis()).unwrap_or(0);
            println!(
                "selftest: rank {} detected at {} ms: peer rank {} failed: {}",
                self.rank,
                now_ms() - age,
                failure.rank,
                failure.reason
            );
        });
    }
}

/// Prints the moment this process learns of a failure (from a thread of its own, so that a rank
/// that is sleeping or computing reports it too), and on SIGTERM from the launcher waits up to a
/// second for the failure to arrive before exiting, so that the line is not lost.
fn watch_health(detection: Arc<Detection>) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(runtime) = runtime else {
            return;
        };
        runtime.block_on(async move {
            let Ok(mut terminate) = signal(SignalKind::terminate()) else {
                return;
            };
            let health = detection.health.clone();
            tokio::select! {
                _ = health.failed() => detection.print(),
                _ = terminate.recv() => {
                    let failed = health.failed();
                    if tokio::time::timeout(Duration::from_secs(1), failed).await.is_ok() {
                        detection.print();
                    }
                    std::process::exit(143);
                }
            }
            terminate.recv().await;
            std::process::exit(143);
        });
    });
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0)
}
