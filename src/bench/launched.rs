//! `bench train` strategies whose devices live in several processes (`procN`): the bench
//! launches `meshflow launch --nproc-per-node N -- meshflow bench train --strategies … ` on
//! loopback, as a user's job runs; every launched rank joins the job and trains its device of
//! the same session over the job's QUIC data plane, and rank 0 prints its figure on a marked
//! line for the bench to read back.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::Arc;

use crate::dist::{self, JoinOptions};
use crate::plan::strategies::SessionStrategy;
use crate::Error;

use super::report::TrainFigure;
use super::train::{Model, Timing, TrainRunner};
use super::{figure_of, BenchArgs, BenchError};

/// The line prefix of rank 0's figure on its standard output.
const FIGURE_MARKER: &str = "TRAIN_FIGURE ";

/// Whether this process is a rank that `meshflow launch` (or srun, mpirun) started.
pub fn is_launched_rank() -> bool {
    std::env::var_os("WORLD_SIZE").is_some()
}

/// `strategy` as `--strategies` text that parses back to it.
pub fn strategy_text(strategy: &SessionStrategy) -> String {
    let zero = if strategy.zero { "zero" } else { "" };
    format!(
        "dp{}tp{}pp{}mb{}proc{}{zero}",
        strategy.dp, strategy.tp, strategy.pp, strategy.micro_batches, strategy.processes
    )
}

/// Launches the ranks of `strategy` (this binary, on loopback) for `model` and returns the
/// figure rank 0 printed.
pub fn figure(
    args: &BenchArgs,
    model: Model,
    strategy: SessionStrategy,
    peak: f64,
) -> Result<TrainFigure, BenchError> {
    let runtime = |text: String| BenchError::Meshflow(Error::Runtime(text));
    let binary = std::env::current_exe().map_err(|e| runtime(format!("meshflow binary: {e}")))?;
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map_err(|e| runtime(format!("no free port for the bench's job: {e}")))?
        .port();
    let output = Command::new(&binary)
        .args(["launch", "--nproc-per-node", &strategy.processes.to_string()])
        .args(["--master-addr", "127.0.0.1", "--master-port", &port.to_string(), "--"])
        .arg(&binary)
        .args(["bench", "train", "--no-torch", "--models", model.name()])
        .args(["--strategies", &strategy_text(&strategy)])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--min-steps", &args.min_steps.to_string()])
        .args(["--peak-gflops", &(peak / 1e9).to_string()])
        .env_remove("SLURM_PROCID")
        .env_remove("OMPI_COMM_WORLD_RANK")
        .output()
        .map_err(|e| runtime(format!("{}: {e}", binary.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find_map(|line| line.split_once(FIGURE_MARKER).map(|(_, f)| f));
    match (output.status.success(), line) {
        (true, Some(line)) => serde_json::from_str(line)
            .map_err(|e| runtime(format!("launched rank's figure {line:?}: {e}"))),
        _ => Err(runtime(format!(
            "{} on {}: the launched ranks failed ({}):\n{stdout}\n{}",
            model.name(),
            strategy.label(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))),
    }
}

/// One launched rank: joins the job with one device, trains `model` on `strategy` over it for
/// `timing`, and on rank 0 prints the figure.
pub fn rank(
    model: Model,
    strategy: SessionStrategy,
    timing: Timing,
    peak: f64,
) -> Result<(), BenchError> {
    let world = dist::init()?;
    let options = JoinOptions { devices: 1, ..JoinOptions::default() };
    let job = Arc::new(world.join(&options)?);
    let mut runner = TrainRunner::new(model, strategy, Some(Arc::clone(&job)))?;
    let figure = figure_of(model, strategy, timing, peak, &mut runner, || {})?;
    if world.rank == 0 {
        let line = serde_json::to_string(&figure)
            .map_err(|e| BenchError::Meshflow(Error::Runtime(format!("train figure: {e}"))))?;
        println!("{FIGURE_MARKER}{line}");
    }
    drop(runner);
    job.barrier("bench/train/done")?;
    if let Ok(job) = Arc::try_unwrap(job) {
        job.finish()?;
    }
    Ok(())
}
