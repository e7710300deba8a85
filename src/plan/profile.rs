//! Measured kernel times: the second cost model for devices we have.
//!
//! The roofline ([`super::cost`]) prices a kernel from its FLOPs and bytes and a few machine
//! figures. On a device we can run, each distinct kernel of the program (op, attributes and local
//! shapes) can instead be timed: [`KernelProfile::measure`] runs every one on inputs of its
//! shapes with the device's thread budget and keeps the fastest of a few calls. The simulator
//! then schedules measured kernels and α–β communication, so what it still has to predict is
//! the overlap, the waiting and the runtime between kernels.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshflow_ops::{Context, OpRef, Tensor as HostTensor, TensorMeta};

use crate::compile::actors::local_meta;
use crate::compile::{Program, Step};
use crate::Result;

/// Seconds per distinct kernel, by [`KernelProfile::key`].
#[derive(Clone, Debug, Default)]
pub struct KernelProfile {
    seconds: HashMap<String, f64>,
    /// Kernels that could not run on made-up inputs (priced by the roofline instead).
    pub failed: usize,
}

impl KernelProfile {
    /// The key of a kernel: the op with its attributes and its local input metas.
    pub fn key(op: &OpRef, inputs: &[TensorMeta]) -> String {
        format!("{op:?} {inputs:?}")
    }

    /// Measured seconds of a kernel, if it was profiled.
    pub fn seconds(&self, op: &OpRef, inputs: &[TensorMeta]) -> Option<f64> {
        self.seconds.get(&Self::key(op, inputs)).copied()
    }

    /// Distinct kernels measured.
    pub fn len(&self) -> usize {
        self.seconds.len()
    }

    /// Whether nothing was measured.
    pub fn is_empty(&self) -> bool {
        self.seconds.is_empty()
    }

    /// Times every distinct kernel of `program` (every rank's) with `threads` threads: the
    /// median call within `budget` per kernel (at least 3 calls, after one warm-up call), each
    /// call after the caches were filled with other data. The median, not the fastest: a step
    /// is a sum of kernels, each at its typical time.
    pub fn measure(program: &Program, threads: usize, budget: Duration) -> Result<Self> {
        let ctx = Context::with_threads(threads);
        let mut profile = KernelProfile::default();
        let mut tried = std::collections::HashSet::new();
        for step in &program.steps {
            let Step::Kernel { inputs, ops, node, .. } = step else { continue };
            let ranks = program.graph.node(*node).placement.ranks().to_vec();
            for (op, rank) in ops.iter().zip(ranks) {
                let metas: Vec<TensorMeta> =
                    inputs.iter().filter_map(|s| local_meta(program, *s, rank)).collect();
                let key = Self::key(op, &metas);
                if !tried.insert(key.clone()) {
                    continue;
                }
                match time_kernel(op, &ctx, &metas, budget) {
                    Some(seconds) => {
                        profile.seconds.insert(key, seconds);
                    }
                    None => profile.failed += 1,
                }
            }
        }
        Ok(profile)
    }
}

/// Bytes written between timed calls to evict the kernel's data from the caches.
const FLUSH_BYTES: usize = 32 << 20;

/// Inputs of the given metas: standard normal values for floats, zeros (valid indices) else.
fn made_up_inputs(metas: &[TensorMeta]) -> Option<Vec<HostTensor>> {
    metas
        .iter()
        .enumerate()
        .map(|(index, meta)| {
            if meta.dtype.is_float() {
                HostTensor::randn(meta.shape.clone(), 0.0, 1.0, meta.dtype, index as u64).ok()
            } else {
                Some(HostTensor::zeros(meta.shape.clone(), meta.dtype))
            }
        })
        .collect()
}

fn time_kernel(op: &OpRef, ctx: &Context, metas: &[TensorMeta], budget: Duration) -> Option<f64> {
    let inputs = made_up_inputs(metas)?;
    op.forward(ctx, &inputs).ok()?;
    let started = Instant::now();
    let mut times = Vec::new();
    let mut flush = vec![0u8; FLUSH_BYTES];
    while times.len() < 3 || started.elapsed() < budget {
        // In a step a kernel's inputs were written by other kernels since it last ran: start
        // each timed call with caches holding something else, as it does there.
        flush.iter_mut().for_each(|byte| *byte = byte.wrapping_add(1));
        std::hint::black_box(&flush);
        let call = Instant::now();
        std::hint::black_box(op.forward(ctx, &inputs).ok()?);
        times.push(call.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}
