//! One step of a lowered program on a machine whose device threads outnumber its cores: every
//! act that computes or copies (a kernel, a gradient sum, a boxing step) holds one of `cores`
//! cores for its duration, and ready acts take free cores in the order they became ready (as
//! the operating system hands a core to runnable threads in turn; an act here is short against
//! a scheduler's time slice, so it runs to its end once it has a core): any free core, or with
//! the threads bound to cores as a session binds them, its own thread's core ([`Cores`]).
//! Leaves, joins and ends take no time and no core. Each actor acts once per step (pieces are actors of their own), so
//! the plan of one step is a graph of dependencies: an act waits for the producers of its input
//! edges (a variable's update edge belongs to the next step) and for its stream's previous act.
//!
//! A collective (all-reduce, reduce-scatter, all-gather, all-to-all: the members of one join)
//! meets at a barrier ([`BarrierWait`]): a member that gets a core before the others arrived
//! keeps it, polling, for `spin`, then releases it and sleeps; when the last member arrives the
//! members still polling go on at once, the sleeping ones are woken and take a core again
//! `wake` later. With at least as many cores as device threads and no barrier waits this is the
//! actor simulator's step; with fewer, a thread whose partner in a collective waits for a core
//! waits too, and polls a core away from the others, which a uniform slowdown of every kernel
//! does not capture.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use meshflow_actor::ActorKind;

use super::cost::ActCosts;
use crate::compile::actors::{ActorProgram, Work};
use crate::compile::{Program, Step};

/// How the members of an in-process collective wait for each other at its barrier.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BarrierWait {
    /// Seconds a member that arrived before the others keeps its core, polling, before it
    /// sleeps (the in-process barrier's spin, `meshflow_comm`'s shared group: 50 µs).
    pub spin: f64,
    /// Seconds from the last member's arrival until a sleeping member can run again (its
    /// wake-up; measured, [`super::machine::Measured::wake_latency`]).
    pub wake: f64,
}

/// The in-process barrier's spin before a waiting member sleeps (`SPIN` in
/// `meshflow_comm::collective::shared`).
pub const BARRIER_SPIN: f64 = 50e-6;

/// The step's length in seconds when `actors` (lowered from `program`, every rank kept) act
/// with `costs` on `cores` cores with collectives whose members meet at once (no barrier
/// waits), and the seconds of core time its acts took. See [`step_on_cores_waiting`].
pub fn step_on_cores(
    program: &Program,
    actors: &ActorProgram,
    costs: &ActCosts,
    cores: usize,
) -> (f64, f64) {
    step_on_cores_waiting(program, actors, costs, cores, BarrierWait::default())
}

/// What happens at an event's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// An act ends (or an act that needs no core becomes done).
    End,
    /// A woken member of a collective wants a core.
    Wake,
    /// A polling member's spin runs out.
    Spin,
}

/// Where a member of a collective is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Away,
    Polling,
    Sleeping,
    Going,
}

/// The cores device threads run on: how many, and whether each thread is bound to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cores {
    /// How many.
    pub count: usize,
    /// Each device thread bound to core `device id mod count`, as a session binds them when
    /// they outnumber the cores (`meshflow_actor::affinity`): a ready act waits for its own
    /// thread's core, not for any free one, so two busy threads bound to one core take turns
    /// while another core may idle. Unbound (`From<usize>`): any free core.
    pub bound: bool,
}

impl Cores {
    /// `count` cores with the device threads bound round-robin.
    pub fn bound(count: usize) -> Self {
        Cores { count, bound: true }
    }
}

impl From<usize> for Cores {
    fn from(count: usize) -> Self {
        Cores { count, bound: false }
    }
}

/// The step's length in seconds when `actors` act with `costs` on `cores` and the members of
/// a collective wait for each other as `barrier` says (see the module doc), and the seconds of
/// core time its acts took (polling not counted).
pub fn step_on_cores_waiting(
    program: &Program,
    actors: &ActorProgram,
    costs: &ActCosts,
    cores: impl Into<Cores>,
    barrier: BarrierWait,
) -> (f64, f64) {
    let Cores { count: cores, bound } = cores.into();
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
    let gangs = Gangs::new(program, actors, &consumers);
    // Per core queue: its capacity, and the queue of each actor.
    let cores = cores.max(1);
    let (queues, capacity) = if bound { (cores, 1) } else { (1, cores) };
    let queue_of = |actor: usize| plan.actors[actor].device.0 as usize % queues;
    let mut member = vec![Member::Away; count];
    let mut arrived = vec![0usize; gangs.members.len()];
    let ns = |seconds: f64| (seconds.max(0.0) * 1e9).round() as u64;
    let (spin, wake) = (ns(barrier.spin), ns(barrier.wake));
    // Acts waiting for a core by (ready time, actor); timed events by (time, event, actor).
    let mut ready: Vec<BTreeSet<(u64, usize)>> = vec![BTreeSet::new(); queues];
    let mut events: BinaryHeap<Reverse<(u64, Event, usize)>> = BinaryHeap::new();
    let become_ready =
        |actor: usize, at: u64, ready: &mut Vec<BTreeSet<_>>, events: &mut BinaryHeap<_>| {
            if holds_core(actor) {
                ready[queue_of(actor)].insert((at, actor));
            } else {
                events.push(Reverse((at, Event::End, actor)));
            }
        };
    for actor in (0..count).filter(|&actor| waiting[actor] == 0) {
        become_ready(actor, 0, &mut ready, &mut events);
    }
    let (mut free, mut now, mut busy) = (vec![capacity; queues], 0u64, 0u64);
    let duration = |actor: usize| costs.durations.get(actor).copied().unwrap_or(0);
    loop {
        // The earliest-ready act of a queue with a free core.
        let next = |free: &[usize], ready: &mut [BTreeSet<(u64, usize)>]| {
            let queue = (0..queues).find(|&q| free[q] > 0 && !ready[q].is_empty())?;
            ready[queue].pop_first().map(|(_, actor)| (queue, actor))
        };
        while let Some((queue, actor)) = next(&free, &mut ready) {
            free[queue] -= 1;
            let gang = gangs.of[actor];
            let go = match gang {
                Some(gang) if member[actor] == Member::Away => {
                    arrived[gang] += 1;
                    if arrived[gang] < gangs.members[gang].len() {
                        if spin == 0 {
                            member[actor] = Member::Sleeping;
                            free[queue] += 1;
                        } else {
                            member[actor] = Member::Polling;
                            events.push(Reverse((now + spin, Event::Spin, actor)));
                        }
                        false
                    } else {
                        for &other in &gangs.members[gang] {
                            match member[other] {
                                Member::Polling => {
                                    member[other] = Member::Going;
                                    busy += duration(other);
                                    events.push(Reverse((
                                        now + duration(other),
                                        Event::End,
                                        other,
                                    )));
                                }
                                Member::Sleeping => {
                                    member[other] = Member::Going;
                                    events.push(Reverse((now + wake, Event::Wake, other)));
                                }
                                Member::Away | Member::Going => {}
                            }
                        }
                        true
                    }
                }
                _ => true,
            };
            if go {
                member[actor] = Member::Going;
                busy += duration(actor);
                events.push(Reverse((now + duration(actor), Event::End, actor)));
            }
        }
        let Some(Reverse((at, event, actor))) = events.pop() else { break };
        now = at;
        match event {
            Event::Wake => {
                ready[queue_of(actor)].insert((now, actor));
            }
            Event::Spin => {
                if member[actor] == Member::Polling {
                    member[actor] = Member::Sleeping;
                    free[queue_of(actor)] += 1;
                }
            }
            Event::End => {
                free[queue_of(actor)] += usize::from(holds_core(actor));
                for &next in &consumers[actor] {
                    waiting[next] -= 1;
                    if waiting[next] == 0 {
                        become_ready(next, now, &mut ready, &mut events);
                    }
                }
            }
        }
    }
    (now as f64 / 1e9, busy as f64 / 1e9)
}

/// The collectives of a plan: per join of a step that meets at a barrier, its members (the
/// boxing acts it feeds).
struct Gangs {
    /// Per gang, its member actors.
    members: Vec<Vec<usize>>,
    /// Per actor, its gang.
    of: Vec<Option<usize>>,
}

impl Gangs {
    fn new(program: &Program, actors: &ActorProgram, consumers: &[Vec<usize>]) -> Self {
        let plan = &actors.plan;
        let mut gangs = Gangs { members: Vec::new(), of: vec![None; plan.actors.len()] };
        for (join, spec) in plan.actors.iter().enumerate() {
            let Work::Join { step } = spec.payload.work else { continue };
            let Step::Boxing { plan: boxing, .. } = &program.steps[step] else { continue };
            let meets = boxing.steps.iter().any(|s| {
                use meshflow_placement::StepKind::*;
                matches!(
                    s.kind,
                    AllReduce { .. } | ReduceScatter { .. } | AllGather { .. } | AllToAll { .. }
                )
            });
            let mut members: Vec<usize> = consumers[join].clone();
            members.sort_unstable();
            members.dedup();
            if !meets || members.len() < 2 {
                continue;
            }
            for &member in &members {
                gangs.of[member] = Some(gangs.members.len());
            }
            gangs.members.push(members);
        }
        gangs
    }
}
