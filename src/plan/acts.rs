//! What a real session's steps spent in their acts: the actor driver's trace of a calibration
//! session, cut into steps, summed per rank. It splits a prediction's error in two: kernels
//! priced wrong (the measured busiest rank's kernels against the profiled ones) or the time
//! between and around them (the measured step against the measured kernels).

use std::collections::{BTreeMap, HashMap};

use meshflow_actor::Trace;
use serde::{Deserialize, Serialize};

use super::cost::{cold_fractions, ActCosts};
use super::profile::KernelProfile;
use meshflow_ops::{OpRef, TensorMeta};

use crate::compile::actors::{local_meta, ActorProgram, ActorWork, Work};
use crate::compile::{Program, Step};

/// The medians, over the measured steps, of what the busiest rank's acts took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeasuredActs {
    /// Seconds of kernels (and gradient sums) of the rank that computed longest in the step.
    pub compute: f64,
    /// Seconds of boxing acts (collectives, transfers: their waiting included) of the rank that
    /// spent longest in them.
    pub communication: f64,
    /// Seconds from the step's first act to its last.
    pub span: f64,
    /// Of `communication`, the seconds its boxing acts took beyond the shortest act of the same
    /// boxing step (over every rank that ran it) in the same step: the waiting for the group's
    /// later members (arrival skew, a partner waiting for a core), an upper bound where a step
    /// has several groups.
    #[serde(default)]
    pub waiting: f64,
}

/// Cuts `trace` (of a session that ran `steps` steps of `actors`, lowered from `program`) into
/// steps and returns the medians of the steps from `first` on; `None` if the trace is empty.
/// Each actor acts the same number of times per step, so its `i`-th act (by sequence) belongs
/// to step `i / acts per step`.
pub fn measured_acts(
    trace: &Trace,
    program: &Program,
    actors: &ActorProgram,
    steps: usize,
    first: usize,
) -> Option<MeasuredActs> {
    let mut by_actor: HashMap<usize, Vec<(u64, u64, u64)>> = HashMap::new();
    for event in &trace.events {
        let acts = by_actor.entry(event.actor.index()).or_default();
        acts.push((event.sequence, event.start, event.end));
    }
    let steps = steps.max(1);
    // Per (boxing step, its act's index in the actor's acts), the shortest act over the ranks.
    let mut shortest: HashMap<(usize, usize), u64> = HashMap::new();
    for (&actor, acts) in by_actor.iter_mut() {
        acts.sort_unstable();
        let Some(spec) = actors.plan.actors.get(actor) else { continue };
        if let Work::Step { step } = spec.payload.work {
            if act_kind(program, spec.payload.work) == Kind::Communication {
                for (index, (_, start, end)) in acts.iter().enumerate() {
                    let took = end.saturating_sub(*start);
                    let least = shortest.entry((step, index)).or_insert(took);
                    *least = (*least).min(took);
                }
            }
        }
    }
    let mut per_step = vec![StepActs::default(); steps];
    for (actor, acts) in by_actor {
        let Some(spec) = actors.plan.actors.get(actor) else { continue };
        let kind = act_kind(program, spec.payload.work);
        let per = (acts.len() / steps).max(1);
        for (index, (_, start, end)) in acts.into_iter().enumerate() {
            let Some(step) = per_step.get_mut(index / per) else { break };
            let least = match spec.payload.work {
                Work::Step { step } => shortest.get(&(step, index)).copied(),
                _ => None,
            };
            let waited = least.map_or(0, |least| end.saturating_sub(start).saturating_sub(least));
            step.add(spec.payload.rank, kind, (start, end), waited);
        }
    }
    let measured: Vec<MeasuredActs> =
        per_step.iter().skip(first).filter_map(StepActs::summary).collect();
    if measured.is_empty() {
        return None;
    }
    let median = |pick: fn(&MeasuredActs) -> f64| {
        let mut values: Vec<f64> = measured.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Some(MeasuredActs {
        compute: median(|m| m.compute),
        communication: median(|m| m.communication),
        span: median(|m| m.span),
        waiting: median(|m| m.waiting),
    })
}

/// Per actor of the traced plan, the median seconds of its act over the steps from `first` on
/// (of `steps` run); `None` for actors that did not act. Each actor acts once per step (pieces
/// are actors of their own).
pub fn actor_medians(trace: &Trace, actors: usize, steps: usize, first: usize) -> Vec<Option<f64>> {
    let mut by_actor: Vec<Vec<(u64, u64)>> = vec![Vec::new(); actors];
    for event in &trace.events {
        if let Some(acts) = by_actor.get_mut(event.actor.index()) {
            acts.push((event.sequence, event.end.saturating_sub(event.start)));
        }
    }
    by_actor
        .into_iter()
        .map(|mut acts| {
            acts.sort_unstable();
            let per = (acts.len() / steps.max(1)).max(1);
            let chunks = acts.chunks(per).skip(first);
            let mut took: Vec<u64> =
                chunks.map(|chunk| chunk.iter().map(|(_, ns)| ns).sum()).collect();
            took.sort_unstable();
            took.get(took.len() / 2).map(|&ns| ns as f64 / 1e9)
        })
        .collect()
}

/// One line of [`kernel_table`]: sums over the acts of one op in one phase.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelSums {
    /// Acts.
    pub acts: usize,
    /// Seconds they took in the real step (median per act).
    pub measured: f64,
    /// Seconds the cost model priced them at.
    pub priced: f64,
    /// Seconds the roofline (no profile) priced them at.
    pub roofline: f64,
    /// Seconds of their profiled warm and cold calls.
    pub warm: f64,
    /// See `warm`.
    pub cold: f64,
    /// Sum of their cold fractions ([`cold_fractions`]).
    pub cold_fraction: f64,
}

/// What one actor of a lowered plan does on its rank, for the per-op tables.
enum RankAct<'a> {
    /// A kernel: the rank's op and its local input metas.
    Kernel { op: &'a OpRef, metas: Vec<TensorMeta>, step: usize },
    /// A boxing step: its kinds joined (`all-reduce`, `send-recv+slice-copy`).
    Boxing(String),
    /// The addition of a piece's gradient to the sum.
    Accumulate,
}

impl RankAct<'_> {
    /// Kernels and accumulations compute; boxing communicates.
    fn computes(&self) -> bool {
        !matches!(self, RankAct::Boxing(_))
    }

    /// The op's name, `boxing KINDS` or `accumulate`.
    fn name(&self) -> String {
        match self {
            RankAct::Kernel { op, .. } => op.name().to_string(),
            RankAct::Boxing(kinds) => format!("boxing {kinds}"),
            RankAct::Accumulate => "accumulate".to_string(),
        }
    }
}

/// What the actor `spec` does on its rank; `None` for leaves, joins and ends (and a kernel its
/// rank does not run).
fn rank_act<'a>(
    program: &'a Program,
    spec: &meshflow_actor::ActorSpec<ActorWork>,
) -> Option<RankAct<'a>> {
    let rank = spec.payload.rank;
    match spec.payload.work {
        Work::Step { step } => match &program.steps[step] {
            Step::Boxing { plan, .. } => {
                let kinds: Vec<_> = plan.steps.iter().map(|s| s.kind.name()).collect();
                Some(RankAct::Boxing(kinds.join("+")))
            }
            Step::Kernel { node, inputs, ops, .. } => {
                let placement = &program.graph.node(*node).placement;
                let index = placement.ranks().iter().position(|&r| r == rank)?;
                let metas = inputs.iter().filter_map(|s| local_meta(program, *s, rank)).collect();
                Some(RankAct::Kernel { op: &ops[index], metas, step })
            }
            Step::Leaf { .. } => None,
        },
        Work::Accumulate { .. } => Some(RankAct::Accumulate),
        Work::Join { .. } | Work::End => None,
    }
}

/// The rank whose compute acts (kernels, accumulations) took the most of `seconds` (per actor
/// of `lowered`, from [`actor_medians`]).
fn busiest_rank(program: &Program, lowered: &ActorProgram, seconds: &[Option<f64>]) -> usize {
    let mut per_rank: BTreeMap<usize, f64> = BTreeMap::new();
    for (spec, took) in lowered.plan.actors.iter().zip(seconds) {
        if rank_act(program, spec).is_some_and(|act| act.computes()) {
            *per_rank.entry(spec.payload.rank).or_default() += took.unwrap_or(0.0);
        }
    }
    per_rank.iter().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(rank, _)| *rank)
}

/// The busiest rank ([`busiest_rank`]) and its acts that do something, by actor index.
fn busiest_acts<'a>(
    program: &'a Program,
    lowered: &'a ActorProgram,
    seconds: &[Option<f64>],
) -> (usize, impl Iterator<Item = (usize, RankAct<'a>)> + 'a) {
    let busiest = busiest_rank(program, lowered, seconds);
    let acts = lowered.plan.actors.iter().enumerate().filter_map(move |(id, spec)| {
        (spec.payload.rank == busiest).then(|| rank_act(program, spec)).flatten().map(|a| (id, a))
    });
    (busiest, acts)
}

/// The busiest rank's compute acts (most measured seconds) of a session's plan `lowered`,
/// summed per op name and phase, and its boxing acts per kind (their waiting included):
/// measured (`seconds`, per actor, from [`actor_medians`]), priced (`costs`: profiled, and
/// `roofline`), and the profile's warm and cold times. Where a prediction's kernels are wrong,
/// this says which. Returns the rank and its lines.
pub fn kernel_table(
    program: &Program,
    lowered: &ActorProgram,
    (costs, roofline): (&ActCosts, &ActCosts),
    profile: &KernelProfile,
    cache_bytes: f64,
    seconds: &[Option<f64>],
) -> (usize, BTreeMap<String, KernelSums>) {
    let (busiest, acts) = busiest_acts(program, lowered, seconds);
    let cold = cold_fractions(program, lowered, cache_bytes);
    let mut lines: BTreeMap<String, KernelSums> = BTreeMap::new();
    for (id, act) in acts {
        let (name, times) = match &act {
            RankAct::Kernel { op, metas, step } => {
                (format!("{} {:?}", act.name(), lowered.phases[*step]), profile.times(op, metas))
            }
            _ => (act.name(), None),
        };
        let line = lines.entry(name).or_default();
        line.acts += 1;
        line.measured += seconds.get(id).copied().flatten().unwrap_or(0.0);
        line.priced += costs.durations.get(id).copied().unwrap_or(0) as f64 / 1e9;
        line.roofline += roofline.durations.get(id).copied().unwrap_or(0) as f64 / 1e9;
        line.warm += times.map_or(0.0, |t| t.warm);
        line.cold += times.map_or(0.0, |t| t.cold);
        line.cold_fraction += cold.get(id).copied().unwrap_or(1.0);
    }
    (busiest, lines)
}

/// One op of a measured step's profile ([`op_profile`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpTime {
    /// The op's name (`matmul`, `layer_norm_grad`), `boxing KINDS` (`boxing all-reduce`) or
    /// `accumulate`.
    pub op: String,
    /// Its acts in one step on the rank.
    pub acts: usize,
    /// Seconds per step: the sum of its acts' medians over the measured steps.
    pub seconds: f64,
    /// FLOPs per step of its acts (`Op::flops` on the rank's local shapes; 0 for boxing and
    /// accumulation).
    pub flops: u64,
}

impl OpTime {
    /// FLOP/s over its seconds (0 when it took none).
    pub fn flops_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.flops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Where the busiest rank of a measured session spends its step, per op: its acts of each op
/// (or boxing kind), their median seconds per step (`seconds`, per actor of `lowered`, from
/// [`actor_medians`]) summed, and their FLOPs, most seconds first. Returns the rank and the
/// ops. What PyTorch's profiler's table of key averages says, from the actor trace.
pub fn op_profile(
    program: &Program,
    lowered: &ActorProgram,
    seconds: &[Option<f64>],
) -> (usize, Vec<OpTime>) {
    let (busiest, acts) = busiest_acts(program, lowered, seconds);
    let mut ops: BTreeMap<String, OpTime> = BTreeMap::new();
    for (id, act) in acts {
        let name = act.name();
        let line =
            ops.entry(name.clone()).or_insert(OpTime { op: name, acts: 0, seconds: 0.0, flops: 0 });
        line.acts += 1;
        line.seconds += seconds.get(id).copied().flatten().unwrap_or(0.0);
        if let RankAct::Kernel { op, metas, .. } = &act {
            line.flops += op.flops(metas);
        }
    }
    let mut ops: Vec<OpTime> = ops.into_values().collect();
    ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.op.cmp(&b.op)));
    (busiest, ops)
}

/// [`kernel_table`] as text, with a total line for the compute acts and one for the boxing.
pub fn format_kernel_table(rank: usize, lines: &BTreeMap<String, KernelSums>) -> String {
    let line = |name: &str, sums: &KernelSums| {
        format!(
            "{name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2}\n",
            sums.acts,
            sums.measured * 1e3,
            sums.priced * 1e3,
            sums.roofline * 1e3,
            sums.warm * 1e3,
            sums.cold * 1e3,
            sums.cold_fraction / sums.acts.max(1) as f64
        )
    };
    let mut text = format!(
        "rank {rank}: op phase | acts | measured ms | priced ms | roofline ms | warm ms | cold ms \
         | mean cold\n"
    );
    let (mut total, mut boxing) = (KernelSums::default(), KernelSums::default());
    for (name, sums) in lines {
        text += &line(name, sums);
        let sum = if name.starts_with("boxing") { &mut boxing } else { &mut total };
        sum.acts += sums.acts;
        sum.measured += sums.measured;
        sum.priced += sums.priced;
        sum.roofline += sums.roofline;
        sum.warm += sums.warm;
        sum.cold += sums.cold;
        sum.cold_fraction += sums.cold_fraction;
    }
    text + &line("total", &total) + &line("boxing total", &boxing)
}

/// What an act is, for the sums.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compute,
    Communication,
    Other,
}

fn act_kind(program: &Program, work: Work) -> Kind {
    match work {
        Work::Step { step } => match program.steps.get(step) {
            Some(Step::Kernel { .. }) => Kind::Compute,
            Some(Step::Boxing { .. }) => Kind::Communication,
            _ => Kind::Other,
        },
        Work::Accumulate { .. } => Kind::Compute,
        Work::Join { .. } | Work::End => Kind::Other,
    }
}

/// One step's sums per rank (nanoseconds: compute, communication, of which waiting) and its
/// first start and last end.
#[derive(Clone, Default)]
struct StepActs {
    per_rank: HashMap<usize, (u64, u64, u64)>,
    first: Option<u64>,
    last: u64,
}

impl StepActs {
    fn add(&mut self, rank: usize, kind: Kind, (start, end): (u64, u64), waited: u64) {
        let took = end.saturating_sub(start);
        let sums = self.per_rank.entry(rank).or_default();
        match kind {
            Kind::Compute => sums.0 += took,
            Kind::Communication => {
                sums.1 += took;
                sums.2 += waited;
            }
            Kind::Other => {}
        }
        self.first = Some(self.first.map_or(start, |first| first.min(start)));
        self.last = self.last.max(end);
    }

    fn summary(&self) -> Option<MeasuredActs> {
        let first = self.first?;
        let most = |pick: fn(&(u64, u64, u64)) -> u64| {
            self.per_rank.values().map(pick).max().unwrap_or(0) as f64 / 1e9
        };
        // The waiting of the rank that spent longest in boxing acts.
        let talker = self.per_rank.values().max_by_key(|sums| sums.1);
        Some(MeasuredActs {
            compute: most(|sums| sums.0),
            communication: most(|sums| sums.1),
            span: self.last.saturating_sub(first) as f64 / 1e9,
            waiting: talker.map_or(0.0, |sums| sums.2 as f64 / 1e9),
        })
    }
}

#[cfg(test)]
mod tests {
    use meshflow_actor::{ActorId, DeviceId, TraceEvent};

    use super::*;

    fn act(actor: u32, sequence: u64, start: u64, end: u64) -> TraceEvent {
        TraceEvent { actor: ActorId(actor), device: DeviceId(0), sequence, start, end }
    }

    #[test]
    fn actor_medians_take_the_median_step_after_the_warm_ups() {
        // Actor 0 acts once per step for 4 steps (the first a warm-up): 100, 10, 30, 20 ns.
        // Actor 1 acts twice per step (ends of two pieces in one actor): 5 + 5 in each step.
        let mut events = vec![act(0, 0, 0, 100), act(0, 1, 0, 10), act(0, 2, 0, 30)];
        events.push(act(0, 3, 0, 20));
        events.extend((0..8).map(|sequence| act(1, sequence, 0, 5)));
        let trace = Trace { events };
        let medians = actor_medians(&trace, 3, 4, 1);
        assert_eq!(medians[0], Some(20e-9), "median of 10, 30, 20");
        assert_eq!(medians[1], Some(10e-9), "two acts per step summed");
        assert_eq!(medians[2], None, "an actor that never acted");
    }
}
