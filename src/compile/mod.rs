//! Compile: from the logical graph to a physical program every rank can run.
//!
//! 1. Selection (`meshflow_placement::select`): every node gets an nd-signature, chosen by the
//!    cost model among the products of its op's 1-D signatures; leaves (inputs, parameters,
//!    constants) are sources whose layout the user fixed or the selection chooses.
//! 2. Boxing insertion: where a producer's layout differs from what a consumer's signature needs,
//!    a boxing plan (`meshflow_placement::plan_boxing`) converts it; one conversion of a value to a
//!    layout serves every consumer that needs it.
//! 3. Lowering: a list of [`Step`]s in one global order, each over [`Slot`]s (a value in one
//!    layout); every rank runs the steps it takes part in, in that order, so collectives are issued
//!    in the same order everywhere. Kernels carry their per-shard op (`Op::localize`).

pub mod actors;
mod dot;
mod lower;

use std::fmt;

use meshflow_ops::{OpRef, Value};
use meshflow_placement::select::{SelectionReport, Strategy};
use meshflow_placement::{BoxingPlan, CostConfig, Layout};

use crate::graph::{GraphData, NodeId};

pub use dot::View;
pub use lower::{compile, Request};

/// How to compile.
#[derive(Clone, Debug)]
pub struct CompileConfig {
    /// The cost model of signature selection.
    pub cost: CostConfig,
    /// Greedy or searched selection. Default: searched.
    pub strategy: Strategy,
}

impl Default for CompileConfig {
    fn default() -> Self {
        CompileConfig { cost: CostConfig::default(), strategy: Strategy::Search }
    }
}

/// A value in one layout: what a rank holds one shard of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

/// What a slot is.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotInfo {
    /// The logical value.
    pub value: Value,
    /// Its layout in this slot.
    pub layout: Layout,
}

/// One step of the program, run by every rank of its placement(s) in program order.
#[derive(Clone, Debug)]
pub enum Step {
    /// A leaf (input, parameter, constant): each rank takes its shard of the host value.
    Leaf {
        /// The leaf value.
        value: Value,
        /// Where its shard goes.
        slot: Slot,
    },
    /// Converts `from` into `to` (same value, another layout).
    Boxing {
        /// Source slot.
        from: Slot,
        /// Target slot.
        to: Slot,
        /// The plan.
        plan: BoxingPlan,
    },
    /// Runs a node on every rank of its placement.
    Kernel {
        /// The node.
        node: NodeId,
        /// Input slots (in the layouts of the chosen signature).
        inputs: Vec<Slot>,
        /// Output slots.
        outputs: Vec<Slot>,
        /// The op each rank runs, by position in the placement (`Op::localize`).
        ops: Vec<OpRef>,
    },
}

/// The physical program: slots, steps and the selection that made them.
#[derive(Clone, Debug)]
pub struct Program {
    /// The logical graph compiled.
    pub graph: GraphData,
    /// Every slot.
    pub slots: Vec<SlotInfo>,
    /// The steps, in the one global order.
    pub steps: Vec<Step>,
    /// Per value, the slot its producer (or leaf) writes.
    pub produced: Vec<Slot>,
    /// Requested slots: for each requested `(value, layout)`, the slot that holds it.
    pub requested: Vec<Slot>,
    /// Every rank that takes part, sorted.
    pub ranks: Vec<usize>,
    /// Per step, the slots nothing reads after it (and nobody requested): a rank drops its
    /// shards of them once the step ran, so a step holds only the tensors still needed.
    pub frees: Vec<Vec<Slot>>,
    /// What selection chose, with the boxing per edge.
    pub selection: SelectionReport,
}

impl Program {
    /// For each step, the slots whose last reader it is (requested slots are kept).
    pub fn last_uses(steps: &[Step], slots: usize, requested: &[Slot]) -> Vec<Vec<Slot>> {
        let mut last: Vec<Option<usize>> = vec![None; slots];
        for (index, step) in steps.iter().enumerate() {
            let (reads, writes): (&[Slot], &[Slot]) = match step {
                Step::Leaf { slot, .. } => (&[], std::slice::from_ref(slot)),
                Step::Boxing { from, to, .. } => {
                    (std::slice::from_ref(from), std::slice::from_ref(to))
                }
                Step::Kernel { inputs, outputs, .. } => (inputs, outputs),
            };
            for slot in reads.iter().chain(writes) {
                last[slot.0 as usize] = Some(index);
            }
        }
        for slot in requested {
            last[slot.0 as usize] = None;
        }
        let mut frees = vec![Vec::new(); steps.len()];
        for (slot, step) in last.into_iter().enumerate() {
            if let Some(step) = step {
                frees[step].push(Slot(slot as u32));
            }
        }
        frees
    }

    /// The slot info.
    pub fn slot(&self, slot: Slot) -> &SlotInfo {
        &self.slots[slot.0 as usize]
    }

    /// Communicating boxing steps of the given kind name (`all-reduce` …) in the program.
    pub fn count_boxing(&self, kind: &str) -> usize {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Boxing { plan, .. } => Some(plan),
                _ => None,
            })
            .flat_map(|plan| &plan.steps)
            .filter(|step| step.kind.name() == kind)
            .count()
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "program: {} steps over ranks {:?}", self.steps.len(), self.ranks)?;
        for step in &self.steps {
            match step {
                Step::Leaf { value, slot } => {
                    let info = self.slot(*slot);
                    writeln!(f, "  leaf {} -> {}", self.graph.label(*value), info.layout)?;
                }
                Step::Boxing { from, plan, .. } => {
                    let value = self.slot(*from).value;
                    writeln!(
                        f,
                        "  boxing {}: {} => {}",
                        self.graph.label(value),
                        plan.source,
                        plan.target
                    )?;
                    for s in &plan.steps {
                        writeln!(f, "    {s}")?;
                    }
                }
                Step::Kernel { node, inputs, outputs, .. } => {
                    let n = self.graph.node(*node);
                    let sbps = |slots: &[Slot]| {
                        slots
                            .iter()
                            .map(|s| self.slot(*s).layout.nd_sbp.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    writeln!(
                        f,
                        "  {} on {}: {} -> {}",
                        n.op.name(),
                        n.placement,
                        sbps(inputs),
                        sbps(outputs)
                    )?;
                }
            }
        }
        Ok(())
    }
}
