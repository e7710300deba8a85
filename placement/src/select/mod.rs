//! Signature selection over a graph: one nd-signature per op, minimising boxing, compute and
//! memory ([`CostConfig`]), and a report of the boxing it implies.
//!
//! ```
//! use meshflow_placement::select::{select, OpNode, SelectionGraph, Strategy, TensorSpec};
//! use meshflow_placement::{CostConfig, DeviceType, Placement, Sbp, Signature};
//! let mesh = Placement::line(DeviceType::Cpu, 4).unwrap();
//! let x = TensorSpec::new([64, 32], 4);
//! let mut graph = SelectionGraph::new();
//! let same = |sbp| Signature::new([sbp], [sbp]);
//! let source = [Signature::new([], [Sbp::Split(0)]), Signature::new([], [Sbp::Broadcast])];
//! let input = OpNode::new("input", mesh.clone(), vec![], vec![x.clone()], &source, 0).unwrap();
//! let input = graph.add_op(input.fix_output(0, Sbp::Split(0)));
//! let signatures = [same(Sbp::Split(0)), same(Sbp::Broadcast)];
//! let relu = OpNode::new("relu", mesh, vec![x.clone()], vec![x], &signatures, 2048).unwrap();
//! let relu = graph.add_op(relu);
//! graph.connect(input, 0, relu, 0).unwrap();
//! let report = select(&graph, &CostConfig::default(), Strategy::Search).unwrap();
//! assert_eq!(report.ops[1].signature.to_string(), "(S(0)) -> (S(0))");
//! assert!(report.edges.is_empty());
//! ```

mod cost;
mod graph;
mod search;
pub mod synthetic;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use crate::{plan_boxing, BoxingPlan, Layout, NdSignature, Result};

pub use cost::CostConfig;
pub use graph::{Edge, OpId, OpNode, SelectionGraph, TensorSpec};

use cost::CostTables;
use search::{total_cost, Adjacency};

/// How to choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Each op in topological order takes the cheapest candidate given its producers.
    Greedy,
    /// Dynamic programming over chains and trees, coordinate descent over the whole DAG, and
    /// the greedy answer: the cheapest of them.
    Search,
}

/// The chosen signature of one op.
#[derive(Clone, Debug, PartialEq)]
pub struct OpChoice {
    /// The op's name.
    pub name: String,
    /// Its chosen nd-signature.
    pub signature: NdSignature,
    /// Seconds of compute and memory under it.
    pub seconds: f64,
}

/// The boxing inserted on one edge (only edges that need one are listed).
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeBoxing {
    /// The edge.
    pub edge: Edge,
    /// Producer name.
    pub producer: String,
    /// Consumer name.
    pub consumer: String,
    /// The plan, with the bytes of each step.
    pub plan: BoxingPlan,
    /// Seconds it costs.
    pub seconds: f64,
}

/// What selection chose and what it costs.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectionReport {
    /// The strategy used.
    pub strategy: Strategy,
    /// Per op, in id order.
    pub ops: Vec<OpChoice>,
    /// Per edge that needs boxing, in edge order.
    pub edges: Vec<EdgeBoxing>,
    /// Total cost of the choice, in seconds.
    pub total_seconds: f64,
    /// Total cost of the greedy choice, for comparison.
    pub greedy_seconds: f64,
}

impl SelectionReport {
    /// Bytes one device receives in all boxing of one forward run.
    pub fn boxing_bytes_per_rank(&self) -> u64 {
        self.edges.iter().map(|edge| edge.plan.bytes_per_rank()).sum()
    }

    /// How many boxing steps of the given kind name (`all-reduce` …) the choice inserts.
    pub fn count_steps(&self, name: &str) -> usize {
        let steps = self.edges.iter().flat_map(|edge| &edge.plan.steps);
        steps.filter(|step| step.kind.name() == name).count()
    }
}

impl fmt::Display for SelectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "selection ({:?}): {:.3e} s (greedy {:.3e} s), boxing {} B/rank",
            self.strategy,
            self.total_seconds,
            self.greedy_seconds,
            self.boxing_bytes_per_rank()
        )?;
        for op in &self.ops {
            writeln!(f, "  op {}: {} ({:.3e} s)", op.name, op.signature, op.seconds)?;
        }
        for edge in &self.edges {
            writeln!(f, "  edge {} -> {}: {:.3e} s", edge.producer, edge.consumer, edge.seconds)?;
            for step in &edge.plan.steps {
                writeln!(f, "    {step}")?;
            }
        }
        Ok(())
    }
}

/// Chooses a signature for every op of `graph`.
///
/// Errors: an op whose fixed SBPs admit none of its candidates, an nd-SBP that does not fit
/// its op's placement, a split axis out of range, a cycle.
pub fn select(
    graph: &SelectionGraph,
    config: &CostConfig,
    strategy: Strategy,
) -> Result<SelectionReport> {
    let order = graph.topological_order()?.into_iter().map(|id| id.0).collect();
    let tables = CostTables::build(graph, config)?;
    let adjacency = Adjacency::new(graph, order);
    let greedy = search::greedy(&tables, &adjacency);
    let greedy_seconds = total_cost(&tables, &adjacency, &greedy);
    let choice = match strategy {
        Strategy::Greedy => greedy,
        Strategy::Search => search::search(&tables, &adjacency, config.improvement_rounds),
    };
    report(graph, config, &tables, &choice, strategy, greedy_seconds)
}

fn report(
    graph: &SelectionGraph,
    config: &CostConfig,
    tables: &CostTables,
    choice: &[usize],
    strategy: Strategy,
    greedy_seconds: f64,
) -> Result<SelectionReport> {
    let signature = |op: usize| &graph.ops()[op].candidates[tables.candidates[op][choice[op]]];
    let ops = graph
        .ops()
        .iter()
        .enumerate()
        .map(|(index, op)| OpChoice {
            name: op.name.clone(),
            signature: signature(index).clone(),
            seconds: tables.ops[index][choice[index]],
        })
        .collect();
    let mut edges = Vec::new();
    let mut plans: HashMap<(&TensorSpec, Layout, Layout), BoxingPlan> = HashMap::new();
    for edge in graph.edges() {
        let producer = graph.op(edge.producer);
        let consumer = graph.op(edge.consumer);
        let from = &signature(edge.producer.0).outputs[edge.output];
        let to = &signature(edge.consumer.0).inputs[edge.input];
        if producer.placement == consumer.placement && from == to {
            continue;
        }
        let spec = &producer.outputs[edge.output];
        let source = Layout::new(producer.placement.clone(), from.clone());
        let target = Layout::new(consumer.placement.clone(), to.clone());
        let plan = match plans.entry((spec, source, target)) {
            Entry::Occupied(known) => known.get().clone(),
            Entry::Vacant(slot) => {
                let (_, source, target) = slot.key();
                let plan = plan_boxing(&spec.shape, spec.dtype_size, source, target)?;
                slot.insert(plan).clone()
            }
        };
        edges.push(EdgeBoxing {
            edge: *edge,
            producer: producer.name.clone(),
            consumer: consumer.name.clone(),
            seconds: config.boxing_seconds(&plan),
            plan,
        });
    }
    let adjacency_order = (0..graph.ops().len()).collect();
    let total_seconds = total_cost(tables, &Adjacency::new(graph, adjacency_order), choice);
    Ok(SelectionReport { strategy, ops, edges, total_seconds, greedy_seconds })
}
