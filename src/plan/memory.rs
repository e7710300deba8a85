//! Memory per device: parameters, optimizer state, and the peak of everything else a step holds,
//! from the program's slot lifetimes ([`Program::frees`]).

use meshflow_ops::Value;

use crate::compile::actors::{local_meta, step_slots};
use crate::compile::{Program, Slot, Step};
use crate::graph::Source;

/// Bytes one rank holds (in the graph's dtypes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// The rank.
    pub rank: usize,
    /// Its shards of the model parameters.
    pub parameters: u64,
    /// Its shards of the optimizer state.
    pub optimizer: u64,
    /// The most bytes of other slots (activations, gradients, boxing buffers, inputs, constants)
    /// alive at once, walking the program in order and dropping each slot after its last use.
    pub activations_peak: u64,
}

impl Memory {
    /// Everything at the peak.
    pub fn total(&self) -> u64 {
        self.parameters + self.optimizer + self.activations_peak
    }
}

/// The memory of every rank of `program`; `states` are the optimizer's variables, every other
/// parameter counts as a model parameter; `in_place` slots (new values of variables, written
/// over the old ones) count for nothing.
pub fn memory(program: &Program, states: &[Value], in_place: &[Slot]) -> Vec<Memory> {
    let ranks = program.ranks.iter();
    ranks.map(|&rank| rank_memory(program, states, in_place, rank)).collect()
}

/// The rank whose total is largest (the one that must fit).
pub fn largest(memories: &[Memory]) -> Memory {
    memories.iter().copied().max_by_key(Memory::total).unwrap_or_default()
}

fn rank_memory(program: &Program, states: &[Value], in_place: &[Slot], rank: usize) -> Memory {
    let bytes = |slot: Slot| {
        local_meta(program, slot, rank).map_or(0, |m| (m.shape.numel() * m.dtype.size()) as u64)
    };
    let mut memory = Memory { rank, ..Memory::default() };
    let mut resident = vec![false; program.slots.len()];
    for slot in in_place {
        resident[slot.0 as usize] = true;
    }
    let mut live = 0u64;
    for (index, step) in program.steps.iter().enumerate() {
        if let Step::Leaf { value, slot } = step {
            if let Source::Parameter { .. } = program.graph.value(*value).source {
                resident[slot.0 as usize] = true;
                if states.contains(value) {
                    memory.optimizer += bytes(*slot);
                } else {
                    memory.parameters += bytes(*slot);
                }
                continue;
            }
        }
        for slot in step_slots(step).1.into_iter().filter(|s| !resident[s.0 as usize]) {
            live += bytes(slot);
        }
        memory.activations_peak = memory.activations_peak.max(live);
        for slot in &program.frees[index] {
            if !resident[slot.0 as usize] {
                live = live.saturating_sub(bytes(*slot));
            }
        }
    }
    memory
}
