//! Simulating one representative rank per placement instead of every rank.
//!
//! The strategies a planner compares (data, tensor and pipeline parallel and their products) are
//! symmetric: the ranks of one placement run the same kernels on shards of the same shapes, and a
//! collective's members reach it together. The simulated step is then decided by any one rank of
//! each placement; the others only repeat its acts. [`prune`] keeps the actors of the
//! [`representatives`] (the first rank of every placement the program uses) and the joins of
//! their groups, and drops the rest. The cost of a boxing act still comes from its plan's full
//! group size, so nothing about the collectives' price changes: only the number of actors does
//! (a 512-device data-parallel step simulates one rank rather than 512).
//!
//! Uneven shards break the symmetry slightly; the first rank holds the largest shard under the
//! split rule, so the pruned step is the slower one. `tests/plan_simulator.rs` checks that the
//! pruned prediction equals the full one on symmetric meshes.

use std::collections::BTreeSet;

use meshflow_actor::{ActorId, Plan};

use crate::compile::actors::{ActorProgram, ActorWork};
use crate::compile::Program;

/// The first rank of every placement of `program`'s slots and nodes.
pub fn representatives(program: &Program) -> BTreeSet<usize> {
    let slots = program.slots.iter().map(|slot| &slot.layout.placement);
    let nodes = program.graph.nodes.iter().map(|node| &node.placement);
    slots.chain(nodes).filter_map(|placement| placement.ranks().first().copied()).collect()
}

/// The plan restricted to actors on ranks in `keep` (a join is kept when its group's first rank
/// is); edges keep only their kept consumers, and an edge from a dropped actor or left without
/// consumers is dropped; the kept ranks' stream chains are kept.
pub fn prune(lowered: &ActorProgram, keep: &BTreeSet<usize>) -> ActorProgram {
    let mut plan: Plan<ActorWork> = Plan::new();
    let renamed: Vec<Option<ActorId>> = lowered
        .plan
        .actors
        .iter()
        .map(|spec| {
            keep.contains(&spec.payload.rank)
                .then(|| plan.add_actor(spec.name.clone(), spec.kind, spec.device, spec.payload))
        })
        .collect();
    let kept = |actor: &ActorId| renamed.get(actor.index()).copied().flatten();
    for edge in &lowered.plan.edges {
        let Some(producer) = kept(&edge.producer) else { continue };
        let consumers: Vec<ActorId> = edge.consumers.iter().filter_map(kept).collect();
        if !consumers.is_empty() {
            plan.add_edge(producer, &consumers, edge.registers);
        }
    }
    // The kept ranks' stream chains, renamed (the cache-aware pricing walks them).
    let chains = lowered
        .chains
        .iter()
        .filter(|((rank, _), _)| keep.contains(rank))
        .map(|(key, chain)| (*key, chain.iter().filter_map(kept).collect()))
        .collect();
    ActorProgram {
        plan,
        streams: lowered.streams,
        pieces: lowered.pieces,
        phases: lowered.phases.clone(),
        accumulated: lowered.accumulated.clone(),
        order: lowered.order,
        forward_end: lowered.forward_end,
        chains,
    }
}
