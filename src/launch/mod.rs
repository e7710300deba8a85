//! `meshflow launch`: starts the workers of one node, torchrun-style.
//!
//! ```text
//! meshflow launch --nnodes 2 --node-rank 0 --nproc-per-node 4 \
//!     --master-addr node01 --secret-file ~/.meshflow/job.secret -- ./train --epochs 3
//! ```
//!
//! Each worker gets torchrun's variables (`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`) and `MESHFLOW_SECRET_FILE`, the path of a file
//! that holds the job secret (see [`secret`] for why a file and not the secret itself).
//! [`crate::dist::init`] reads them. Output lines are prefixed `[rank N] `. When a worker fails,
//! the others are stopped within `--stop-grace-secs` and the launcher exits with status 1 and a
//! message naming the rank, its exit status or signal, and its last lines; `--max-restarts N`
//! restarts the whole group up to N times first.

pub mod hostlist;
mod output;
pub mod plan;
pub mod secret;
pub mod selftest;
pub mod supervise;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use plan::NodePlan;
use supervise::{describe_status, Outcome, SuperviseOptions};

/// The flags of `meshflow launch`.
#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Number of nodes (launcher invocations) in the job [default: 1, or the number of srun /
    /// mpirun tasks].
    #[arg(long, value_name = "N")]
    pub nnodes: Option<usize>,
    /// Index of this node, 0..nnodes [default: 0 on one node, else $NODE_RANK or the srun /
    /// mpirun task index].
    #[arg(long, value_name = "N")]
    pub node_rank: Option<usize>,
    /// Workers to start on this node.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_nproc)]
    pub nproc_per_node: usize,
    /// Host of rank 0, which serves the rendezvous [default: $MASTER_ADDR, the first host of
    /// $SLURM_JOB_NODELIST, or 127.0.0.1].
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous on the master [default: $MASTER_PORT or 29500].
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// How many times to restart the whole group after a worker fails.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_restarts: u32,
    /// Also write each rank's output to `DIR/rank<N>.log`.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Seconds the other workers get to exit after SIGTERM before SIGKILL, when one fails or the
    /// launcher is interrupted.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0,
          value_parser = parse_grace)]
    pub stop_grace_secs: f64,
    /// File holding the job secret (mode 0600, the same on every node). Required with more than
    /// one node; on one node a fresh secret is made for the job when it is absent.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// The worker program and its arguments (after `--`, or directly).
    #[arg(value_name = "PROGRAM", required = true, num_args = 1..,
          trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

fn parse_nproc(text: &str) -> Result<usize, String> {
    let count: usize = text.parse().map_err(|_| format!("{text:?} is not a count"))?;
    if !(1..=4096).contains(&count) {
        return Err("must be between 1 and 4096".to_string());
    }
    Ok(count)
}

fn parse_grace(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.0..=3600.0).contains(&seconds) {
        return Err("must be between 0 and 3600 seconds".to_string());
    }
    Ok(seconds)
}

/// Why the launcher could not start the job.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Flags and environment do not make a valid plan (shown as a clap usage error).
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// The job secret could not be made or read (shown as a clap usage error).
    #[error(transparent)]
    Secret(#[from] secret::SecretError),
    /// Starting or watching the workers failed.
    #[error("meshflow launch: {0}")]
    Io(#[from] std::io::Error),
}

/// Resolves the plan from the flags and the process environment.
pub fn plan(args: &LaunchArgs) -> Result<NodePlan, LaunchError> {
    Ok(plan::resolve(args, &|name| std::env::var(name).ok())?)
}

/// Runs `meshflow launch` for an already resolved plan; returns the launcher's exit code.
pub fn run(args: &LaunchArgs, plan: &NodePlan) -> Result<ExitCode, LaunchError> {
    let job_secret = secret::JobSecretFile::for_job(args.secret_file.as_deref(), plan.nnodes)?;
    let options = SuperviseOptions {
        command: args.command.clone(),
        stop_grace: Duration::from_secs_f64(args.stop_grace_secs),
        max_restarts: args.max_restarts,
        log_dir: args.log_dir.clone(),
        secret_file: job_secret.path().to_path_buf(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let hook = report_hook(plan, job_secret.path());
    let outcome = runtime.block_on(supervise::supervise(plan, &options, hook))?;
    Ok(report(&outcome, options.stop_grace))
}

/// How long the launcher tries to tell the rendezvous about a failed worker.
const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Tells the rendezvous which rank failed, so that every other rank names it at once (rather
/// than whichever heartbeat expires first). Rank 0 serves the rendezvous, so its own failure is
/// left to the heartbeats of the others.
fn report_hook(plan: &NodePlan, secret_path: &std::path::Path) -> supervise::FailureHook {
    let master = (plan.master_addr.clone(), plan.master_port);
    let secret_path = secret_path.to_path_buf();
    std::sync::Arc::new(move |failure: &supervise::WorkerFailure| {
        if failure.rank == 0 {
            return;
        }
        let reason = format!("exited with {}", describe_status(failure.status));
        if let Err(error) = report_to_rendezvous(&master, &secret_path, failure.rank, &reason) {
            eprintln!("meshflow launch: could not tell the rendezvous: {error}");
        }
    })
}

fn report_to_rendezvous(
    master: &(String, u16),
    secret_path: &std::path::Path,
    rank: usize,
    reason: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::net::ToSocketAddrs;

    use meshflow_comm::quic::{JobSecret, QuicConfig, QuicEndpoint};

    let secret = JobSecret::new(secret::read(secret_path)?)?;
    let address = master.to_socket_addrs()?.next().ok_or("the master address does not resolve")?;
    let local = std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0);
    let mut config = QuicConfig::default().with_timeouts(REPORT_TIMEOUT);
    config.worker_threads = 1;
    let endpoint =
        QuicEndpoint::bind(local, meshflow_comm::cluster::LAUNCHER_RANK, secret, config)?;
    let reported =
        meshflow_comm::cluster::report_over_quic(&endpoint, address, rank, reason, REPORT_TIMEOUT);
    endpoint.block_on(reported)?;
    Ok(())
}

/// Prints the outcome and turns it into the launcher's exit code.
fn report(outcome: &Outcome, grace: Duration) -> ExitCode {
    match outcome {
        Outcome::Success => ExitCode::SUCCESS,
        Outcome::Interrupted { signal } => {
            eprintln!("meshflow launch: interrupted by signal {signal}; workers stopped");
            ExitCode::from(128u8.saturating_add(u8::try_from(*signal).unwrap_or(0)))
        }
        Outcome::Failed { failure, frozen, stop_time } => {
            eprintln!(
                "meshflow launch: rank {} (pid {}) failed: {}",
                failure.rank,
                failure.pid,
                describe_status(failure.status)
            );
            for rank in frozen {
                eprintln!("meshflow launch: rank {rank} was stopped (SIGSTOP) and not answering");
            }
            eprintln!("meshflow launch: last lines of rank {}:", failure.rank);
            for line in &failure.last_lines {
                eprintln!("    {line}");
            }
            eprintln!(
                "meshflow launch: stopped the other workers in {:.2} s (bound {:.2} s)",
                stop_time.as_secs_f64(),
                grace.as_secs_f64()
            );
            ExitCode::FAILURE
        }
    }
}
