//! What a real session's steps spent in their acts: the actor driver's trace of a calibration
//! session, cut into steps, summed per rank. It splits a prediction's error in two: kernels
//! priced wrong (the measured busiest rank's kernels against the profiled ones) or the time
//! between and around them (the measured step against the measured kernels).

use std::collections::HashMap;

use meshflow_actor::Trace;
use serde::{Deserialize, Serialize};

use crate::compile::actors::{ActorProgram, Work};
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
    let mut per_step = vec![StepActs::default(); steps];
    for (actor, mut acts) in by_actor {
        let Some(spec) = actors.plan.actors.get(actor) else { continue };
        let kind = act_kind(program, spec.payload.work);
        acts.sort_unstable();
        let per = (acts.len() / steps).max(1);
        for (index, (_, start, end)) in acts.into_iter().enumerate() {
            let Some(step) = per_step.get_mut(index / per) else { break };
            step.add(spec.payload.rank, kind, start, end);
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
    })
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

/// One step's sums per rank (nanoseconds) and its first start and last end.
#[derive(Clone, Default)]
struct StepActs {
    per_rank: HashMap<usize, (u64, u64)>,
    first: Option<u64>,
    last: u64,
}

impl StepActs {
    fn add(&mut self, rank: usize, kind: Kind, start: u64, end: u64) {
        let took = end.saturating_sub(start);
        let sums = self.per_rank.entry(rank).or_default();
        match kind {
            Kind::Compute => sums.0 += took,
            Kind::Communication => sums.1 += took,
            Kind::Other => {}
        }
        self.first = Some(self.first.map_or(start, |first| first.min(start)));
        self.last = self.last.max(end);
    }

    fn summary(&self) -> Option<MeasuredActs> {
        let first = self.first?;
        let most = |pick: fn(&(u64, u64)) -> u64| {
            self.per_rank.values().map(pick).max().unwrap_or(0) as f64 / 1e9
        };
        Some(MeasuredActs {
            compute: most(|sums| sums.0),
            communication: most(|sums| sums.1),
            span: self.last.saturating_sub(first) as f64 / 1e9,
        })
    }
}
