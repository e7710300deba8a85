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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use meshflow_comm::cluster::ClusterConfig;

use crate::dist::{self, DistError, Job, JoinOptions};

/// Why the self-test failed.
#[derive(Debug, thiserror::Error)]
enum SelftestError {
    /// Joining or a store operation failed (a peer failure among them).
    #[error(transparent)]
    Dist(#[from] DistError),
    /// A rank stored something else than the protocol says.
    #[error("all-gather check failed: {0}")]
    Mismatch(String),
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
    println!(
        "selftest: joined as rank {} of {} (local rank {}), {} members",
        world.rank,
        world.world_size,
        world.local_rank,
        job.members().len()
    );
    let mut sum = 0;
    for round in 0..args.rounds {
        sum = all_gather_round(&job, round)?;
        println!("selftest: round {round} sum {sum}");
        std::thread::sleep(Duration::from_millis(args.pause_ms));
    }
    job.finish()?;
    Ok(sum)
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

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0)
}
