//! One plan, end to end: build, compile, lower, simulate; and its printed report.

use std::collections::BTreeMap;
use std::fmt;

use super::cluster::Cluster;
use super::memory::{largest, memory, Memory};
use super::model::{build, Built, Workload};
use super::{predict, streams_for, Prediction};
use crate::compile::{CompileConfig, Program, Step};
use crate::Result;

/// Everything `meshflow plan` reports for one workload on one cluster.
#[derive(Clone, Debug)]
pub struct PlanReport {
    /// What was planned.
    pub workload: Workload,
    /// Where.
    pub cluster: Cluster,
    /// Per op and chosen signature, how many kernels use it: `op: inputs -> outputs`.
    pub signatures: BTreeMap<String, usize>,
    /// Per boxing kind (`all-reduce` …): count per micro-batch program and bytes one rank
    /// receives in all of them.
    pub boxing: BTreeMap<String, (usize, u64)>,
    /// The rank with the most memory.
    pub memory: Memory,
    /// The simulated step.
    pub prediction: Prediction,
    /// Model FLOPs of one step (PaLM count).
    pub model_flops: f64,
}

impl PlanReport {
    /// Model FLOPs utilisation: model FLOPs over step time × devices × device peak.
    pub fn mfu(&self) -> f64 {
        let devices = self.workload.strategy.devices() as f64;
        self.model_flops / (self.prediction.step_seconds * devices * self.cluster.device.peak_flops)
    }

    /// Tokens per second of the whole job.
    pub fn tokens_per_second(&self) -> f64 {
        (self.workload.batch * self.workload.model.config.ctx) as f64 / self.prediction.step_seconds
    }
}

/// Plans `workload` on `cluster`: builds, compiles with `compile`, simulates one step.
pub fn plan(
    workload: &Workload,
    cluster: &Cluster,
    compile: &CompileConfig,
    trace: bool,
) -> Result<PlanReport> {
    let built = build(workload, compile)?;
    report(workload, cluster, &built, trace)
}

/// The report of an already built workload.
pub fn report(
    workload: &Workload,
    cluster: &Cluster,
    built: &Built,
    trace: bool,
) -> Result<PlanReport> {
    let program = &built.program;
    let mut config = built.actors.clone();
    config.streams = streams_for(cluster);
    let prediction = predict(program, &config, cluster, trace)?;
    let in_place: Vec<_> = built.actors.updates.iter().map(|(_, slot)| *slot).collect();
    let memories = memory(program, &built.states, &in_place);
    Ok(PlanReport {
        workload: *workload,
        cluster: cluster.clone(),
        signatures: signatures(program),
        boxing: boxing(program),
        memory: largest(&memories),
        prediction,
        model_flops: workload.model.flops_per_token() * built.tokens as f64,
    })
}

/// Kernels counted by op name and chosen nd-SBPs.
pub fn signatures(program: &Program) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for step in &program.steps {
        if let Step::Kernel { node, inputs, outputs, .. } = step {
            let sbps = |slots: &[crate::compile::Slot]| {
                let each = slots.iter().map(|s| program.slot(*s).layout.nd_sbp.to_string());
                each.collect::<Vec<_>>().join(" ")
            };
            let op = program.graph.node(*node).op.name();
            let key = format!("{op}: {} -> {}", sbps(inputs), sbps(outputs));
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    counts
}

/// Communicating boxing steps by kind: count and bytes per rank.
pub fn boxing(program: &Program) -> BTreeMap<String, (usize, u64)> {
    let mut counts = BTreeMap::new();
    for step in &program.steps {
        if let Step::Boxing { plan, .. } = step {
            for s in plan.steps.iter().filter(|s| !s.kind.is_local()) {
                let entry = counts.entry(s.kind.name().to_string()).or_insert((0, 0));
                entry.0 += 1;
                entry.1 += s.bytes_per_rank;
            }
        }
    }
    counts
}

/// Gigabytes with two decimals.
fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        let c = &w.model.config;
        writeln!(
            f,
            "plan: {} ({} parameters, {} layers, d {}, {} heads, ctx {}) as {} on {}",
            w.model.name,
            c.parameters(),
            c.n_layer,
            c.d_model,
            c.n_head,
            c.ctx,
            w.strategy,
            self.cluster
        )?;
        writeln!(f, "batch {} sequences in {} micro-batches", w.batch, w.pieces)?;
        writeln!(f, "signatures (kernels per micro-batch):")?;
        for (signature, count) in &self.signatures {
            writeln!(f, "  {count:>4} × {signature}")?;
        }
        writeln!(f, "boxing per micro-batch program (bytes one rank receives):")?;
        for (kind, (count, bytes)) in &self.boxing {
            writeln!(f, "  {count:>4} × {kind:<15} {}", gb(*bytes))?;
        }
        let m = &self.memory;
        writeln!(
            f,
            "memory on rank {} (graph dtypes): parameters {}, optimizer {}, activations peak {}, \
             total {} of {:.0} GB",
            m.rank,
            gb(m.parameters),
            gb(m.optimizer),
            gb(m.activations_peak),
            gb(m.total()),
            self.cluster.device.memory / 1e9
        )?;
        let p = &self.prediction;
        writeln!(
            f,
            "predicted step {:.3} ms ({} actors simulated; busiest rank: compute {:.3} ms, \
             communication {:.3} ms); {:.0} tokens/s; MFU {:.1}%",
            p.step_seconds * 1e3,
            p.actors,
            p.breakdown.compute * 1e3,
            p.breakdown.communication * 1e3,
            self.tokens_per_second(),
            self.mfu() * 100.0
        )
    }
}
