//! One step of a lowered program on a machine whose device threads outnumber its cores: every
//! act that computes or copies (a kernel, a gradient sum, a boxing step) holds one of `cores`
//! cores for its duration, and ready acts take free cores in the order they became ready (as
//! the operating system hands a core to runnable threads in turn; an act here is short against
//! a scheduler's time slice, so it runs to its end once it has a core). Leaves, joins and ends
//! take no time and no core. Each actor acts once per step (pieces are actors of their own), so
//! the plan of one step is a graph of dependencies: an act waits for the producers of its input
//! edges (a variable's update edge belongs to the next step) and for its stream's previous act.
//!
//! With at least as many cores as device threads this is the actor simulator's step; with fewer,
//! a thread whose partner in a collective waits for a core waits too, which a uniform slowdown
//! of every kernel does not capture.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use meshflow_actor::ActorKind;

use super::cost::ActCosts;
use crate::compile::actors::{ActorProgram, Work};
use crate::compile::{Program, Step};

/// The step's length in seconds when `actors` (lowered from `program`, every rank kept) act
/// with `costs` on `cores` cores (see the module doc), and the seconds of core time its acts
/// took.
pub fn step_on_cores(
    program: &Program,
    actors: &ActorProgram,
    costs: &ActCosts,
    cores: usize,
) -> (f64, f64) {
    let plan = &actors.plan;
    let count = plan.actors.len();
    let mut waiting = vec![0usize; count];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); count];
    for edge in &plan.edges {
        for consumer in &edge.consumers {
            if plan.actors[consumer.index()].kind == ActorKind::Variable {
                continue;
            }
            waiting[consumer.index()] += 1;
            consumers[edge.producer.index()].push(consumer.index());
        }
    }
    let holds_core = |actor: usize| match plan.actors[actor].payload.work {
        Work::Step { step } => !matches!(program.steps[step], Step::Leaf { .. }),
        Work::Accumulate { .. } => true,
        Work::Join { .. } | Work::End => false,
    };
    // Acts waiting for a core by (ready time, actor); started acts by (end time, actor). An
    // act that needs no core ends when it becomes ready.
    let mut ready = Ready::new();
    let mut running = Running::new();
    let become_ready = |actor: usize, at: u64, queues: (&mut Ready, &mut Running)| {
        if holds_core(actor) {
            queues.0.insert((at, actor));
        } else {
            queues.1.push(Reverse((at, actor)));
        }
    };
    for actor in (0..count).filter(|&actor| waiting[actor] == 0) {
        become_ready(actor, 0, (&mut ready, &mut running));
    }
    let (mut free, mut now, mut busy) = (cores.max(1), 0u64, 0u64);
    loop {
        while free > 0 {
            let Some((_, actor)) = ready.pop_first() else { break };
            let took = costs.durations.get(actor).copied().unwrap_or(0);
            free -= 1;
            busy += took;
            running.push(Reverse((now + took, actor)));
        }
        let Some(Reverse((end, actor))) = running.pop() else { break };
        now = end;
        free += usize::from(holds_core(actor));
        for &next in &consumers[actor] {
            waiting[next] -= 1;
            if waiting[next] == 0 {
                become_ready(next, now, (&mut ready, &mut running));
            }
        }
    }
    (now as f64 / 1e9, busy as f64 / 1e9)
}

/// Acts waiting for a core, by (ready time, actor).
type Ready = BTreeSet<(u64, usize)>;

/// Started acts, by (end time, actor), earliest first.
type Running = BinaryHeap<Reverse<(u64, usize)>>;
