//! `meshflow bench comm`: every collective, nccl-tests style (size, time, algbw, busbw, #wrong),
//! over device threads of this process ([`SharedGroup`]) and, under `meshflow launch`, over the
//! launched processes (QUIC, [`TransportCommunicator`]), and over this machine's GPUs with NCCL
//! ([`super::nccl`]). Each call's output is checked against its closed form; busbw uses
//! nccl-tests' factors ([`Collective::bus_factor`]). The memcpy bandwidth of the same run is the
//! reference.
//!
//! Sizes follow nccl-tests: the full tensor of all-reduce, broadcast, reduce, reduce-scatter's
//! input, all-gather's output, all-to-all's per-rank input.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::comm::quic::QuicTransport;
use crate::comm::table::time;
use crate::comm::{Communicator, Rank, ReduceOp, SharedGroup, TransportCommunicator};
use crate::dist::{self, JoinOptions};
use crate::ops::Tensor;

use super::arithmetic::{algorithm_bandwidth, bus_bandwidth, Collective};
use super::report::CommFigure;
use super::BenchError;

/// The sizes and calls per size of the table: the comm crate's, shared with its bench.
pub use crate::comm::table::{iterations, sizes};

/// f32 elements for `bytes`, a positive multiple of `ranks` (so that every member's part is even).
pub fn elements(bytes: usize, ranks: usize) -> usize {
    ((bytes / 4) / ranks * ranks).max(ranks)
}

/// What one member measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemberRun {
    /// Mean seconds per call.
    pub seconds: f64,
    /// Output elements that differ from the closed form.
    pub wrong: usize,
    /// The addresses of its input's and its output's buffers (`None`: no output), which tell a
    /// collective that moved no bytes ([`moved_nothing`]).
    pub buffers: (usize, Option<usize>),
}

/// Runs `collective` on `count` f32 elements `iterations` times after the warm-ups of
/// [`crate::comm::table::time`]; returns the mean seconds per call, the output elements that
/// differ from the closed form and where the buffers were.
pub fn run_collective(
    member: &mut dyn Communicator,
    collective: Collective,
    count: usize,
    iterations: usize,
) -> Result<MemberRun, BenchError> {
    let (i, n) = (member.group_index(), member.group_size());
    let input = input(collective, i, n, count)?;
    let mut output = Ok(None);
    let timing = time(iterations, || {
        if output.is_ok() {
            output = call(member, collective, &input);
        }
    });
    let output = output?;
    let address = |tensor: &Tensor| Arc::as_ptr(tensor.storage()) as usize;
    Ok(MemberRun {
        seconds: timing.seconds,
        wrong: wrong(collective, i, n, count, output.as_ref())?,
        buffers: (address(&input), output.as_ref().map(address)),
    })
}

/// True when every member's output is member 0's input buffer: in one process a broadcast
/// hands the root's tensor to every member (tensors are immutable, so sharing it is a correct
/// broadcast), and such a call moves no bytes, so it has no bandwidth to report.
pub fn moved_nothing(runs: &[MemberRun]) -> bool {
    let Some(root) = runs.first().map(|run| run.buffers.0) else { return false };
    runs.len() > 1 && runs.iter().all(|run| run.buffers.1 == Some(root))
}

/// Member `i`'s input: all-to-all chunk `j` holds `i·n + j`, broadcast's root holds 7 (the
/// others zeros: NCCL's broadcast takes a buffer on every member, and a broadcast that moved
/// nothing leaves them wrong), every other collective takes `[i + 1; …]` (all-gather: `count / n`
/// of them).
pub(super) fn input(
    collective: Collective,
    i: usize,
    n: usize,
    count: usize,
) -> Result<Tensor, BenchError> {
    let values: Vec<f32> = match collective {
        Collective::AllGather => vec![i as f32 + 1.0; count / n],
        Collective::AllToAll => (0..count).map(|k| (i * n + k / (count / n)) as f32).collect(),
        Collective::Broadcast => vec![if i == 0 { 7.0 } else { 0.0 }; count],
        _ => vec![i as f32 + 1.0; count],
    };
    let len = values.len();
    Ok(Tensor::from_vec(values, [len])?)
}

fn call(
    member: &mut dyn Communicator,
    collective: Collective,
    input: &Tensor,
) -> Result<Option<Tensor>, BenchError> {
    Ok(match collective {
        Collective::AllReduce => Some(member.all_reduce(input, ReduceOp::Sum)?),
        Collective::AllGather => Some(member.all_gather(input)?),
        Collective::ReduceScatter => Some(member.reduce_scatter(input, ReduceOp::Sum)?),
        Collective::Broadcast => {
            let mine = (member.group_index() == 0).then_some(input);
            Some(member.broadcast(mine, 0)?)
        }
        Collective::Reduce => member.reduce(input, ReduceOp::Sum, 0)?,
        Collective::AllToAll => Some(member.all_to_all(input)?),
    })
}

/// Elements of member `i`'s output that differ from the closed form (a missing or mis-sized
/// output counts every expected element).
pub(super) fn wrong(
    collective: Collective,
    i: usize,
    n: usize,
    count: usize,
    output: Option<&Tensor>,
) -> Result<usize, BenchError> {
    let sum = (n * (n + 1) / 2) as f32;
    let part = count / n;
    let expected: Vec<f32> = match collective {
        Collective::AllReduce => vec![sum; count],
        Collective::AllGather => (0..count).map(|k| (k / part + 1) as f32).collect(),
        Collective::ReduceScatter => vec![sum; part],
        Collective::Broadcast => vec![7.0; count],
        Collective::Reduce if i == 0 => vec![sum; count],
        Collective::Reduce => return Ok(output.map_or(0, |t| t.numel())),
        Collective::AllToAll => (0..count).map(|k| ((k / part) * n + i) as f32).collect(),
    };
    let Some(output) = output else { return Ok(expected.len()) };
    let values = output.to_vec::<f32>()?;
    if values.len() != expected.len() {
        return Ok(expected.len());
    }
    Ok(values.iter().zip(&expected).filter(|(a, b)| a != b).count())
}

/// One row over `ranks` device threads of this process.
pub fn in_process(
    collective: Collective,
    ranks: usize,
    bytes: usize,
) -> Result<CommFigure, BenchError> {
    let count = elements(bytes, ranks);
    let calls = iterations(bytes);
    let members = SharedGroup::members((0..ranks).map(Rank).collect(), Duration::from_secs(120));
    let handles: Vec<_> = members
        .into_iter()
        .map(|mut member| {
            thread::spawn(move || run_collective(&mut member, collective, count, calls))
        })
        .collect();
    let mut runs = Vec::new();
    for handle in handles {
        let run = handle.join().map_err(|_| BenchError::Panic("a device thread".into()))?;
        runs.push(run?);
    }
    let results: Vec<(f64, usize)> = runs.iter().map(|run| (run.seconds, run.wrong)).collect();
    let row = figure("in-process", collective, ranks, count * 4, &results);
    Ok(if moved_nothing(&runs) { row.moving_nothing() } else { row })
}

/// The row of `collective` over `ranks` members from each member's (seconds, #wrong): the
/// slowest member's time, #wrong summed.
pub(super) fn figure(
    transport: &str,
    collective: Collective,
    ranks: usize,
    bytes: usize,
    results: &[(f64, usize)],
) -> CommFigure {
    let seconds = results.iter().map(|r| r.0).fold(0.0, f64::max);
    CommFigure {
        transport: transport.to_string(),
        collective,
        ranks,
        bytes,
        seconds,
        algbw: algorithm_bandwidth(bytes, seconds),
        busbw: bus_bandwidth(collective, ranks, bytes, seconds),
        wrong: results.iter().map(|r| r.1).sum(),
        shared: false,
    }
}

/// The in-process table: every collective at every size on `ranks` device threads.
pub fn measure_in_process(
    ranks: usize,
    max_bytes: usize,
    mut tick: impl FnMut(&str),
) -> Result<Vec<CommFigure>, BenchError> {
    let mut rows = Vec::new();
    for collective in Collective::ALL {
        for bytes in sizes(max_bytes) {
            tick(&format!("{} {bytes} B", collective.name()));
            rows.push(in_process(collective, ranks, bytes)?);
        }
    }
    Ok(rows)
}

/// Under `meshflow launch` (a world of more than one process): joins the job, connects the QUIC
/// mesh and runs the table over the processes. Rank 0 returns the rows (slowest rank's time,
/// #wrong summed over ranks); other ranks return an empty list. `Ok(None)` when not launched.
pub fn measure_processes(
    max_bytes: usize,
    mut tick: impl FnMut(&str),
) -> Result<Option<Vec<CommFigure>>, BenchError> {
    let world = dist::init()?;
    if world.world_size < 2 {
        return Ok(None);
    }
    let job = world.join(&JoinOptions::default())?;
    let addresses = job.data_addresses()?;
    let transport = QuicTransport::connect_mesh(job.data_endpoint().clone(), &addresses)?;
    let mut group = TransportCommunicator::world(Arc::new(transport))?;
    let (rank, ranks) = (world.rank, world.world_size);
    let mut rows = Vec::new();
    for collective in Collective::ALL {
        for bytes in sizes(max_bytes) {
            tick(&format!("{} {bytes} B over {ranks} processes", collective.name()));
            let count = elements(bytes, ranks);
            let key = format!("bench/{}/{bytes}", collective.name());
            let MemberRun { seconds, wrong, .. } =
                run_collective(&mut group, collective, count, iterations(bytes))?;
            job.set(&format!("{key}/{rank}"), format!("{seconds} {wrong}").as_bytes())?;
            if rank == 0 {
                let results = (0..ranks)
                    .map(|peer| parse_result(&job.get(&format!("{key}/{peer}"))?))
                    .collect::<Result<Vec<_>, _>>()?;
                rows.push(figure("processes", collective, ranks, count * 4, &results));
            }
        }
    }
    // Every rank must be done with the data plane before any closes its endpoint.
    job.barrier("bench/comm")?;
    job.finish()?;
    Ok(Some(rows))
}

fn parse_result(bytes: &[u8]) -> Result<(f64, usize), BenchError> {
    let text = String::from_utf8_lossy(bytes);
    let parsed = text
        .split_once(' ')
        .and_then(|(seconds, wrong)| Some((seconds.parse().ok()?, wrong.parse().ok()?)));
    parsed.ok_or_else(|| BenchError::Peer(format!("unreadable result {text:?}")))
}
