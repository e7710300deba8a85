//! Measured kernel times: the second cost model for devices we have.
//!
//! The roofline ([`super::cost`]) prices a kernel from its FLOPs and bytes and a few machine
//! figures. On a device we can run, each distinct kernel of the program (op, attributes and local
//! shapes) can instead be timed: [`KernelProfile::measure`] runs every one on inputs of its
//! shapes with the device's thread budget, twice: warm (its inputs in cache from the call
//! before) and cold (each call on a copy of its inputs last touched [`FLUSH_BYTES`] ago), the median call
//! of each. The cost model prices an act between the two by how much of its input is still
//! cached in the step ([`super::cost`]). The simulator then schedules measured kernels and α–β
//! communication, so what it still has to predict is the overlap, the waiting and the runtime
//! between kernels.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshflow_ops::{Context, OpRef, Tensor as HostTensor, TensorMeta};

use super::strategies::upper_median;
use crate::compile::actors::local_meta;
use crate::compile::{Program, Slot, Step};
use crate::Result;

/// One kernel's measured seconds with its inputs in cache and out of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelTimes {
    /// Median call right after an identical call (inputs in cache).
    pub warm: f64,
    /// Median call on inputs last touched [`FLUSH_BYTES`] of other data ago.
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
    /// warm-up call), warm (calls back to back) and cold (each call on its own copy of the
    /// inputs, last touched [`FLUSH_BYTES`] of other copies ago). The median, not the
    /// fastest: a step is a sum of kernels, each at its typical time.
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

    /// Also times, warm, the addition that sums each piece's shard of an `accumulated` slot
    /// (per slot of `program`, from [`crate::compile::actors::ActorProgram::accumulated`]) into
    /// its sum ([`KernelProfile::sum_times`]): the runtime adds a piece's shard as its kernel
    /// writes it, in cache.
    pub fn measure_sums(
        &mut self,
        program: &Program,
        accumulated: &[bool],
        threads: usize,
        budget: Duration,
    ) {
        let ctx = Context::with_threads(threads);
        let slots = accumulated.iter().enumerate().filter(|(_, summed)| **summed);
        for (index, _) in slots {
            let slot = Slot(index as u32);
            for &rank in program.slot(slot).layout.placement.ranks() {
                let Some(meta) = local_meta(program, slot, rank) else { continue };
                let metas = [meta.clone(), meta];
                if self.sum_times(&metas[0]).is_some() {
                    continue;
                }
                match time_kernel(&sum_op(), &ctx, &metas, budget, false) {
                    Some(warm) => self.insert(&sum_op(), &metas, KernelTimes { warm, cold: warm }),
                    None => self.failed += 1,
                }
            }
        }
    }

    /// The measured times of adding a shard of `meta` to a sum of the same meta, if profiled
    /// ([`KernelProfile::measure_sums`]).
    pub fn sum_times(&self, meta: &TensorMeta) -> Option<KernelTimes> {
        self.times(&sum_op(), &[meta.clone(), meta.clone()])
    }
}

/// The op the runtime sums pieces' shards with.
fn sum_op() -> OpRef {
    std::sync::Arc::new(meshflow_ops::ops::add::Add)
}

/// Bytes of input copies a cold call cycles through: each cold call reads a copy of its
/// inputs last touched this many bytes of other copies ago (out of a core's cache; on this
/// machine's shared cache too, the effect the whole-batch steps see).
pub const FLUSH_BYTES: usize = 32 << 20;

/// A copy of `tensor` in storage of its own.
fn copy(tensor: &HostTensor) -> Option<HostTensor> {
    HostTensor::from_bytes(tensor.bytes().ok()?, tensor.shape().clone(), tensor.dtype()).ok()
}

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

/// The median seconds of `op`'s calls within `budget`; `cold`: each on a copy of the inputs
/// last touched [`FLUSH_BYTES`] of other copies ago. The copies, not a flush of the caches
/// before each call: in a step a kernel is called among other kernels with its code, stack and
/// allocator hot, and only its inputs were written long before; a flush also evicts those and
/// priced every call of a small kernel with a fixed cost a step does not pay (micro-batched
/// steps measured 0.1–0.25 of the way from warm to the flushed cold time, whole-batch ones
/// 0.35–0.5; docs/plan.md, session 7).
fn time_kernel(
    op: &OpRef,
    ctx: &Context,
    metas: &[TensorMeta],
    budget: Duration,
    cold: bool,
) -> Option<f64> {
    let inputs = made_up_inputs(metas)?;
    let outputs = op.forward(ctx, &inputs).ok()?;
    let tensors = inputs.iter().chain(&outputs);
    let bytes: usize = tensors.map(|t| t.numel() * t.dtype().size()).sum();
    let copies = if cold { FLUSH_BYTES.div_ceil(bytes.max(1)).max(2) } else { 1 };
    let pool: Vec<Vec<HostTensor>> = (0..copies)
        .map(|_| inputs.iter().map(copy).collect::<Option<Vec<_>>>())
        .collect::<Option<_>>()?;
    // Cold: the outputs of the last `copies` calls stay alive, so each call writes into memory
    // freed long before (as a step's kernels do), not into the buffer the previous call freed.
    let mut kept = std::collections::VecDeque::with_capacity(copies);
    let started = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || started.elapsed() < budget {
        let inputs = &pool[times.len() % copies];
        if kept.len() >= copies {
            drop(kept.pop_front());
        }
        let call = Instant::now();
        let outputs = std::hint::black_box(op.forward(ctx, inputs).ok()?);
        times.push(call.elapsed().as_secs_f64());
        if cold {
            kept.push_back(outputs);
        }
    }
    Some(upper_median(&times))
}
