//! The planner: compile a model for a described cluster without running it, and predict its step.
//!
//! 1. [`model::build`] builds a named GPT with a strategy and AdamW, weights described and never
//!    allocated, and compiles it ([`crate::compile`]): SBP per op, boxing with bytes.
//! 2. [`crate::compile::actors::lower_to_actors`] lowers the program to the actor plan (one actor
//!    per step and rank, collectives joined over their groups, micro-batches as pieces).
//! 3. [`cost::ActCosts`] gives every act a duration on the [`cluster::Cluster`] (roofline for
//!    kernels, α–β rings for boxing), and the deterministic [`meshflow_actor::Simulator`] runs one
//!    step: its finishing time is the predicted step time; its trace is a Chrome trace.
//! 4. [`memory::memory`] walks the program's slot lifetimes for memory per device.
//!
//! [`calibrate`] compares predictions with real [`crate::session::Session`] steps on this machine.

pub mod acts;
pub mod calibrate;
pub mod cli;
pub mod cluster;
pub mod cores;
pub mod cost;
pub mod machine;
pub mod memory;
pub mod model;
pub mod processes;
pub mod profile;
pub mod report;
pub mod strategies;
pub mod symmetry;
pub mod table;

use meshflow_actor::workload::NoWork;
use meshflow_actor::Simulator;

use crate::compile::actors::{lower_to_actors, ActorConfig, ActorProgram, Streams};
use crate::compile::Program;
use crate::{Error, Result};

pub use cluster::{Cluster, ClusterError, DeviceSpec, Link, Overrides};
pub use cost::{ActCosts, Breakdown};
pub use memory::Memory;
pub use model::{ModelSpec, Strategy, Workload};

/// A simulated step.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// Predicted seconds of one step (all micro-batches and the update).
    pub step_seconds: f64,
    /// Kernel and boxing seconds on the busiest rank (what overlap can hide, or not).
    pub breakdown: Breakdown,
    /// Actors in the plan.
    pub actors: usize,
    /// The step's Chrome trace (JSON), when asked for.
    pub trace: Option<Vec<u8>>,
}

/// Lowers `program` with `config`, keeps one representative rank per placement
/// ([`symmetry`]), prices every act on `cluster` and simulates one step.
pub fn predict(
    program: &Program,
    config: &ActorConfig,
    cluster: &Cluster,
    trace: bool,
) -> Result<Prediction> {
    predict_measured(program, config, cluster, None, trace)
}

/// Like [`predict`], with kernel times from a [`profile::KernelProfile`] (times a slowdown for
/// devices sharing cores) where it has them.
pub fn predict_measured(
    program: &Program,
    config: &ActorConfig,
    cluster: &Cluster,
    measured: Option<(&profile::KernelProfile, f64)>,
    trace: bool,
) -> Result<Prediction> {
    let lowered = lower_to_actors(program, config)?;
    let lowered = symmetry::prune(&lowered, &symmetry::representatives(program));
    let costs = ActCosts::with_kernels(program, &lowered, cluster, measured);
    simulate(program, &lowered, costs, trace)
}

/// Simulates one step of a lowered program with the given act durations.
pub fn simulate(
    program: &Program,
    lowered: &ActorProgram,
    costs: ActCosts,
    trace: bool,
) -> Result<Prediction> {
    let breakdown = costs.breakdown(program, lowered);
    let runtime = |e: meshflow_actor::Error| Error::Runtime(format!("simulator: {e}"));
    let mut simulator = Simulator::new(&lowered.plan, costs, 1).map_err(runtime)?;
    if trace {
        simulator.enable_trace();
    }
    let report = simulator.run_step(1, &mut NoWork).map_err(runtime)?;
    let trace = match simulator.trace() {
        Some(recorded) => {
            let mut json = Vec::new();
            recorded.write_chrome(&lowered.plan, &mut json).map_err(runtime)?;
            Some(json)
        }
        None => None,
    };
    Ok(Prediction {
        step_seconds: report.finished_at as f64 / 1e9,
        breakdown,
        actors: lowered.plan.actors.len(),
        trace,
    })
}

/// The streams a cluster's devices have: CPU devices run one thread each, GPUs a compute and a
/// communication stream.
pub fn streams_for(cluster: &Cluster) -> Streams {
    if cluster.device.kind == "cpu" {
        Streams::Single
    } else {
        Streams::ComputeAndComm
    }
}
