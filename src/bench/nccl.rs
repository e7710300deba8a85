//! `meshflow bench comm` over this machine's GPUs with NCCL: one thread per GPU, each a rank of
//! one communicator, runs every collective at every size nccl-tests style, with the inputs and
//! the #wrong check of the device-thread rows ([`super::comm`]). One GPU is a world of 1, as
//! nccl-tests runs it: the busbw factors of all-reduce, all-gather, reduce-scatter and
//! all-to-all are then 0 ((n−1)/n), and broadcast's and reduce's are 1, so those rows measure
//! NCCL's local copy.
//!
//! Each call is timed to its completion (the communicator polls its stream without sleeping:
//! nccl-tests' blocking mode, `-z 1`), on device tensors from the device's caching allocator,
//! so steady-state calls allocate nothing. Without the `cuda` feature, a driver, a GPU or
//! `libnccl`, the rows are skipped with the reason ([`GpuRows::Skipped`]), never failed.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::comm::nccl::{nccl_available, NcclAbort, NcclCommunicator, NcclConfig, NcclId};
use crate::comm::table::{iterations, sizes, time};
use crate::comm::{Rank, ReduceOp};
use crate::ops::cuda::{self, CudaDevice};
use crate::ops::Tensor;

use super::arithmetic::Collective;
use super::comm::{elements, figure, input, wrong};
use super::report::CommFigure;
use super::BenchError;

/// The transport name of the GPU rows.
pub const TRANSPORT: &str = "nccl";

/// The GPU rows, or why there are none.
#[derive(Debug)]
pub enum GpuRows {
    /// Every collective at every size over this many GPUs.
    Measured {
        /// GPUs in the communicator.
        gpus: usize,
        /// The rows, in [`Collective::ALL`] order, sizes ascending.
        rows: Vec<CommFigure>,
    },
    /// No GPU rows: the reason (no `cuda` feature, no driver, no GPU, no `libnccl`).
    Skipped(String),
}

/// The one line `meshflow bench comm` prints for `rows`: why they were skipped, or a note on
/// a world of one GPU; `None` for several GPUs.
pub fn summary_line(rows: &GpuRows) -> Option<String> {
    match rows {
        GpuRows::Skipped(reason) => Some(format!("# nccl: GPU rows skipped ({reason})")),
        GpuRows::Measured { gpus: 1, .. } => Some(
            "# nccl: one GPU, a world of 1 (as nccl-tests runs it): busbw of all_reduce, \
             all_gather, reduce_scatter and all_to_all is 0 by nccl-tests' factors; the times \
             are NCCL's local copies"
                .into(),
        ),
        GpuRows::Measured { .. } => None,
    }
}

/// The GPUs NCCL can use here, or why none.
pub fn usable_gpus() -> Result<usize, String> {
    let count = cuda::device_count().map_err(|error| error.to_string())?;
    if count == 0 {
        return Err("the driver sees no GPU".into());
    }
    nccl_available().map_err(|error| error.to_string())?;
    Ok(count)
}

/// The table over every GPU of this machine ([`usable_gpus`]); `tick` names each row as rank
/// 0 starts it.
pub fn measure(max_bytes: usize, mut tick: impl FnMut(&str)) -> Result<GpuRows, BenchError> {
    let gpus = match usable_gpus() {
        Ok(gpus) => gpus,
        Err(reason) => return Ok(GpuRows::Skipped(reason)),
    };
    let id = NcclId::generate()?;
    // One abort for all ranks: a rank that fails ends the others' waits at once.
    let abort = NcclAbort::default();
    let (progress, labels) = mpsc::channel();
    let handles: Vec<_> = (0..gpus)
        .map(|gpu| {
            let (id, abort) = (id.clone(), abort.clone());
            let progress = (gpu == 0).then(|| progress.clone());
            thread::spawn(move || {
                let result = rank_rows(gpu, gpus, &id, abort.clone(), max_bytes, progress);
                if let Err(error) = &result {
                    abort.request(format!("GPU {gpu}: {error}"));
                }
                result
            })
        })
        .collect();
    drop(progress);
    for label in labels {
        tick(&label);
    }
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.join().map_err(|_| BenchError::Panic("a GPU thread".into()))??);
    }
    let rows = table_rows(max_bytes)
        .enumerate()
        .map(|(row, (collective, bytes))| {
            let count = elements(bytes, gpus);
            let per_rank: Vec<(f64, usize)> = results.iter().map(|r| r[row]).collect();
            figure(TRANSPORT, collective, gpus, count * 4, &per_rank)
        })
        .collect();
    Ok(GpuRows::Measured { gpus, rows })
}

/// The rows in table order: every collective at every size.
fn table_rows(max_bytes: usize) -> impl Iterator<Item = (Collective, usize)> {
    Collective::ALL
        .into_iter()
        .flat_map(move |collective| sizes(max_bytes).into_iter().map(move |b| (collective, b)))
}

/// Rank `gpu` of `gpus` (on GPU `gpu`): every row's (seconds per call, #wrong).
fn rank_rows(
    gpu: usize,
    gpus: usize,
    id: &NcclId,
    abort: NcclAbort,
    max_bytes: usize,
    progress: Option<mpsc::Sender<String>>,
) -> Result<Vec<(f64, usize)>, BenchError> {
    let device = CudaDevice::new(gpu)?;
    // Polling without sleeping, as nccl-tests waits: a 100 µs nap would be most of a small call.
    let config = NcclConfig { poll_interval: Duration::ZERO, ..NcclConfig::default() };
    let communicator = NcclCommunicator::init_with_abort(gpu, id, Rank(gpu), gpus, config, abort)?;
    let mut rows = Vec::new();
    for (collective, bytes) in table_rows(max_bytes) {
        if let Some(progress) = &progress {
            let _ = progress.send(format!("{} {bytes} B over {gpus} GPU(s)", collective.name()));
        }
        let count = elements(bytes, gpus);
        rows.push(run_row(&communicator, &device, collective, count, iterations(bytes))?);
    }
    Ok(rows)
}

/// Runs `collective` on `count` f32 elements `calls` times (after the warm-ups of [`time`]) on
/// device tensors; the mean seconds per call and the output elements that differ from the
/// closed form.
fn run_row(
    communicator: &NcclCommunicator,
    device: &CudaDevice,
    collective: Collective,
    count: usize,
    calls: usize,
) -> Result<(f64, usize), BenchError> {
    let (i, n) = (communicator.rank().0, communicator.world_size());
    let on_gpu = device.to_device(&input(collective, i, n, count)?)?;
    let mut output = Ok(None);
    let timing = time(calls, || {
        if output.is_ok() {
            output = call(communicator, device, collective, &on_gpu);
        }
    });
    let output = output?.map(|tensor| cuda::to_host(&tensor)).transpose()?;
    Ok((timing.seconds, wrong(collective, i, n, count, output.as_ref())?))
}

fn call(
    communicator: &NcclCommunicator,
    device: &CudaDevice,
    collective: Collective,
    input: &Tensor,
) -> Result<Option<Tensor>, BenchError> {
    let (c, sum) = (communicator, ReduceOp::Sum);
    Ok(match collective {
        Collective::AllReduce => Some(c.all_reduce_device(device, input, sum)?),
        Collective::AllGather => Some(c.all_gather_device(device, input)?),
        Collective::ReduceScatter => Some(c.reduce_scatter_device(device, input, sum)?),
        Collective::Broadcast => Some(c.broadcast_device(device, input, 0)?),
        Collective::Reduce => c.reduce_device(device, input, sum, 0)?,
        Collective::AllToAll => Some(c.all_to_all_device(device, input)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_the_rows_are_skipped_with_the_reason() {
        if let Ok(gpus) = usable_gpus() {
            // A GPU machine: the rows are measured (the GPU check runs `meshflow bench comm`).
            let rows = measure(1 << 10, |_| {}).expect("GPU rows");
            let GpuRows::Measured { gpus: measured, rows } = rows else { panic!("skipped") };
            assert_eq!(measured, gpus);
            assert_eq!(rows.len(), Collective::ALL.len() * sizes(1 << 10).len());
            assert!(rows.iter().all(|r| r.wrong == 0 && r.transport == TRANSPORT), "{rows:?}");
            return;
        }
        let rows = measure(1 << 10, |_| panic!("no row runs without a GPU")).expect("a skip");
        let GpuRows::Skipped(reason) = &rows else { panic!("measured without a GPU: {rows:?}") };
        assert!(reason.contains("cuda") || reason.contains("GPU"), "{reason}");
        let line = summary_line(&rows).expect("one line");
        assert!(line.starts_with("# nccl: GPU rows skipped (") && line.contains(reason), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn one_gpu_is_noted_and_several_are_not() {
        let one = GpuRows::Measured { gpus: 1, rows: Vec::new() };
        let line = summary_line(&one).expect("a note");
        assert!(line.contains("world of 1") && line.contains("busbw"), "{line}");
        assert_eq!(summary_line(&GpuRows::Measured { gpus: 8, rows: Vec::new() }), None);
        // The factors the note describes.
        assert_eq!(Collective::AllReduce.bus_factor(1), 0.0);
        assert_eq!(Collective::AllToAll.bus_factor(1), 0.0);
        assert_eq!(Collective::Broadcast.bus_factor(1), 1.0);
    }

    #[test]
    fn every_rank_runs_the_rows_in_one_order() {
        let rows: Vec<(Collective, usize)> = table_rows(1 << 10).collect();
        assert_eq!(rows.len(), 12, "6 collectives at 8 B and 1 KiB");
        assert_eq!(rows[0], (Collective::AllReduce, 8));
        assert_eq!(rows[1], (Collective::AllReduce, 1 << 10));
        assert_eq!(rows[11], (Collective::AllToAll, 1 << 10));
    }
}
