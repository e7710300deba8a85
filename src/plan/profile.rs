//! Measured kernel times: the second cost model for devices we have.
//!
//! The roofline ([`super::cost`]) prices a kernel from its FLOPs and bytes and a few machine
//! figures. On a device we can run, each distinct kernel of the program (op, attributes and local
//! shapes) can instead be timed: [`KernelProfile::measure`] runs every one on inputs of its
//! shapes with the device's thread budget, twice: warm (its inputs in cache from the call
//! before) and cold (each call after the caches were filled with other data), the median call
//! of each. The cost model prices an act between the two by how much of its input is still
//! cached in the step ([`super::cost`]). The simulator then schedules measured kernels and α–β
//! communication, so what it still has to predict is the overlap, the waiting and the runtime
//! between kernels.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshflow_ops::{Context, OpRef, Tensor as HostTensor, TensorMeta};

use crate::compile::actors::local_meta;
use crate::compile::{Program, Step};
use crate::Result;

/// One kernel's measured seconds with its inputs in cache and out of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelTimes {
    /// Median call right after an identical call (inputs in cache).
    pub warm: f64,
    /// Median call after the caches were filled with [`FLUSH_BYTES`] of other data.
    pub cold: f64,
}

impl KernelTimes {
    /// The time of a call whose input bytes are a fraction `cold` (0 to 1) out of cache.
    pub fn at(&self, cold: f64) -> f64 {
        self.warm + cold.clamp(0.0, 1.0) * (self.cold - self.warm)
    }
}

/// Warm and cold seconds per distinct kernel, by [`KernelProfile::key`].
#[derive(Clone, Debug, Default)]
pub struct KernelProfile {
    times: HashMap<String, KernelTimes>,
    /// Kernels that could not run on made-up inputs (priced by the roofline instead).
    pub failed: usize,
}

impl KernelProfile {
    /// The key of a kernel: the op with its attributes and its local input metas.
    pub fn key(op: &OpRef, inputs: &[TensorMeta]) -> String {
        format!("{op:?} {inputs:?}")
    }

    /// Measured cold seconds of a kernel, if it was profiled.
    pub fn seconds(&self, op: &OpRef, inputs: &[TensorMeta]) -> Option<f64> {
        self.times(op, inputs).map(|times| times.cold)
    }

    /// Measured warm and cold seconds of a kernel, if it was profiled.
    pub fn times(&self, op: &OpRef, inputs: &[TensorMeta]) -> Option<KernelTimes> {
        self.times.get(&Self::key(op, inputs)).copied()
    }

    /// Records (or replaces) the times of a kernel: for profiles measured elsewhere, and tests.
    pub fn insert(&mut self, op: &OpRef, inputs: &[TensorMeta], times: KernelTimes) {
        self.times.insert(Self::key(op, inputs), times);
    }

    /// Distinct kernels measured.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether nothing was measured.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Times every distinct kernel of `program` (every rank's) with `threads` threads: the
    /// median call within `budget` per kernel and cache state (at least 3 calls, after one
    /// warm-up call), warm (calls back to back) and cold (each call after the caches were
    /// filled with other data). The median, not the fastest: a step is a sum of kernels, each
    /// at its typical time.
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
                let warm = time_kernel(op, &ctx, &metas, budget, false);
                let cold = time_kernel(op, &ctx, &metas, budget, true);
                match warm.zip(cold) {
                    Some((warm, cold)) => {
                        // Noise can put the warm median above the cold one: never price a
                        // cached input dearer than an evicted one.
                        let times = KernelTimes { warm: warm.min(cold), cold };
                        profile.times.insert(key, times);
                    }
                    None => profile.failed += 1,
                }
            }
        }
        Ok(profile)
    }
}

/// Bytes written between cold timed calls to evict the kernel's data from the caches.
pub const FLUSH_BYTES: usize = 32 << 20;

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

/// The median seconds of `op`'s calls within `budget`; `cold`: each after a cache flush.
fn time_kernel(
    op: &OpRef,
    ctx: &Context,
    metas: &[TensorMeta],
    budget: Duration,
    cold: bool,
) -> Option<f64> {
    let inputs = made_up_inputs(metas)?;
    op.forward(ctx, &inputs).ok()?;
    let started = Instant::now();
    let mut times = Vec::new();
    let mut flush = vec![0u8; if cold { FLUSH_BYTES } else { 0 }];
    while times.len() < 3 || started.elapsed() < budget {
        // Cold: start each timed call with caches holding something else, as a kernel whose
        // inputs were written long before does in a step.
        flush.iter_mut().for_each(|byte| *byte = byte.wrapping_add(1));
        std::hint::black_box(&flush);
        let call = Instant::now();
        std::hint::black_box(op.forward(ctx, &inputs).ok()?);
        times.push(call.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}
