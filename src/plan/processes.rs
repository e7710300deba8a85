//! Calibrating a strategy whose devices live in several processes: the calibration launches
//! `meshflow launch --nproc-per-node P -- meshflow plan --calibrate-worker REQUEST` on
//! loopback, as a user's job would run. Every worker joins the job, measures the QUIC link's
//! α–β figures with an all-reduce over the job's data plane (the transport the session's
//! collectives use), runs the char GPT's session over the job, and rank 0 predicts the same
//! program on a cluster whose links are the measured QUIC link, and prints the row for the
//! calibration to read back.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::calibrate::{predict_row, CalibrationConfig, CalibrationRow};
use super::machine::{empty_step, transport_link, Measured};
use super::strategies::{run_session, SessionStrategy, Steps};
use crate::compile::CompileConfig;
use crate::dist::{self, JoinOptions};
use crate::{Error, Result};

/// What a launched worker is asked to calibrate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRequest {
    /// The strategy (its `processes` workers, one device each).
    pub strategy: SessionStrategy,
    /// The session's steps.
    pub steps: Steps,
    /// The machine's figures, measured by the calibration that launched the workers.
    pub measured: Measured,
    /// Greedy signature selection instead of the search.
    pub greedy: bool,
}

/// The line prefix of rank 0's row on its standard output.
const ROW_MARKER: &str = "CALIBRATION_ROW ";

/// Launches the workers of `strategy` with `config.binary` and returns the row rank 0 printed.
pub fn calibrate(
    strategy: &SessionStrategy,
    config: &CalibrationConfig,
    compile: &CompileConfig,
    measured: &Measured,
) -> Result<CalibrationRow> {
    let binary = config.binary.as_ref().ok_or_else(|| {
        Error::Graph(format!(
            "calibrating {strategy}: no meshflow binary to launch the workers with \
             (CalibrationConfig::binary)"
        ))
    })?;
    let request = WorkerRequest {
        strategy: *strategy,
        steps: config.session_steps(),
        measured: *measured,
        greedy: compile.strategy == meshflow_placement::select::Strategy::Greedy,
    };
    let request = serde_json::to_string(&request)
        .map_err(|e| Error::Runtime(format!("calibration request: {e}")))?;
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map_err(|e| Error::Runtime(format!("no free port for the calibration's job: {e}")))?
        .port();
    let output = Command::new(binary)
        .args(["launch", "--nproc-per-node", &strategy.processes.to_string()])
        .args(["--master-addr", "127.0.0.1", "--master-port", &port.to_string(), "--"])
        .arg(binary)
        .args(["plan", "--calibrate-worker", &request])
        .env_remove("SLURM_PROCID")
        .env_remove("OMPI_COMM_WORLD_RANK")
        .output()
        .map_err(|e| Error::Runtime(format!("{}: {e}", binary.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = stdout.lines().find_map(|line| line.split_once(ROW_MARKER).map(|(_, row)| row));
    match (output.status.success(), row) {
        (true, Some(row)) => serde_json::from_str(row)
            .map_err(|e| Error::Runtime(format!("calibration worker's row {row:?}: {e}"))),
        _ => Err(Error::Runtime(format!(
            "calibrating {strategy}: the launched workers failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))),
    }
}

/// One launched worker (`meshflow plan --calibrate-worker REQUEST`; see the module doc).
pub fn worker(request: &str) -> Result<()> {
    let request: WorkerRequest = serde_json::from_str(request)
        .map_err(|e| Error::Graph(format!("calibration request {request:?}: {e}")))?;
    let dist = |e: dist::DistError| Error::Runtime(format!("calibration worker: {e}"));
    let world = dist::init().map_err(dist)?;
    let options = JoinOptions { devices: 1, ..JoinOptions::default() };
    let job = Arc::new(world.join(&options).map_err(dist)?);
    let ranks: Vec<usize> = (0..world.world_size).collect();
    let evict = (2.0 * request.measured.cache_bytes(1)) as usize;
    let link = transport_link(job.communicator(&ranks).map_err(dist)?.as_mut(), evict)?;
    let strategy = match request.greedy {
        true => meshflow_placement::select::Strategy::Greedy,
        false => meshflow_placement::select::Strategy::Search,
    };
    let compile = CompileConfig { strategy, ..CompileConfig::default() };
    let ran = run_session(&request.strategy, request.steps, &compile, Some(Arc::clone(&job)))?;
    if world.rank == 0 {
        let devices = request.strategy.devices();
        let cluster = request.measured.cluster_with_link(devices, link);
        let fixed = empty_step(1, 1)?;
        let row =
            predict_row(&request.strategy, &ran, &cluster, &request.measured, fixed, Vec::new())?;
        let row = serde_json::to_string(&row)
            .map_err(|e| Error::Runtime(format!("calibration row: {e}")))?;
        println!("{ROW_MARKER}{row}");
    }
    drop(ran);
    job.barrier("calibrate/done").map_err(dist)?;
    if let Ok(job) = Arc::try_unwrap(job) {
        job.finish().map_err(dist)?;
    }
    Ok(())
}
