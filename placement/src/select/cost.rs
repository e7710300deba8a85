//! The cost model: boxing bytes over bandwidth, compute split by parallelism, and memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::{local_region, plan_boxing, BoxingPlan, Layout, NdSbp, NdSignature, Result};

use super::graph::{OpNode, SelectionGraph};

/// What selection minimises, in seconds of one forward run per device.
///
/// `cost = Σ_ops (flops · share / flops_per_second + memory_weight · local bytes)
///        + Σ_edges Σ_steps (bytes_per_rank / bandwidth + step_latency)`, where `share` is
/// `1/p_k` for each mesh axis on which the signature splits a tensor (work on a partial-sum or
/// broadcast axis is not divided) and `local bytes` are the op's inputs and outputs as the
/// first device holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct CostConfig {
    /// Bytes per second one device receives in a collective or transfer. Default `50e9`
    /// (an NVLink-class link share).
    pub bandwidth: f64,
    /// Seconds added per communicating boxing step (launch and latency). Default `10e-6`.
    pub step_latency: f64,
    /// Floating-point operations per second of one device. Default `50e12`.
    pub flops_per_second: f64,
    /// Seconds charged per byte of an op's local inputs and outputs, which favours layouts
    /// that hold less. Default `1e-13` (0.1 ms per GB): small next to communication.
    pub memory_weight: f64,
    /// Rounds of coordinate descent in the search. Default `8`.
    pub improvement_rounds: usize,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            bandwidth: 50e9,
            step_latency: 10e-6,
            flops_per_second: 50e12,
            memory_weight: 1e-13,
            improvement_rounds: 8,
        }
    }
}

impl CostConfig {
    /// Seconds a boxing plan takes.
    pub fn boxing_seconds(&self, plan: &BoxingPlan) -> f64 {
        let bytes = plan.bytes_per_rank() as f64 / self.bandwidth;
        bytes + plan.communicating_steps() as f64 * self.step_latency
    }

    /// Seconds of compute and memory for `op` under `signature`.
    pub fn op_seconds(&self, op: &OpNode, signature: &NdSignature) -> f64 {
        let hierarchy = op.placement.hierarchy();
        let share: f64 = (0..hierarchy.len())
            .filter(|&k| {
                let axis = signature.inputs.iter().chain(&signature.outputs);
                axis.into_iter().any(|nd| nd.0[k].split_axis().is_some())
            })
            .map(|k| 1.0 / hierarchy[k] as f64)
            .product();
        let compute = op.flops as f64 * share / self.flops_per_second;
        let tensors = op.inputs.iter().zip(&signature.inputs);
        let tensors = tensors.chain(op.outputs.iter().zip(&signature.outputs));
        let bytes: usize = tensors
            .map(|(spec, nd)| local_numel(&spec.shape, nd, hierarchy) * spec.dtype_size)
            .sum();
        compute + self.memory_weight * bytes as f64
    }
}

/// Elements the first device holds (the most, with balanced splits).
fn local_numel(shape: &[usize], nd_sbp: &NdSbp, hierarchy: &[usize]) -> usize {
    let zero = vec![0; hierarchy.len()];
    local_region(shape, nd_sbp, hierarchy, &zero).map_or(0, |region| region.numel())
}

/// The costs selection reads: per op and usable candidate, and per edge and candidate pair.
pub(crate) struct CostTables {
    /// Usable candidate positions per op.
    pub candidates: Vec<Vec<usize>>,
    /// Seconds per op and usable candidate (same order as `candidates`).
    pub ops: Vec<Arc<Vec<f64>>>,
    /// Seconds per edge, row-major over (producer candidate, consumer candidate); edges of the
    /// same kind (tensor, placements, candidate sets) share one table.
    pub edges: Vec<Arc<Vec<f64>>>,
}

/// A boxing request, for the cache of boxing costs.
type BoxingKey = (Vec<usize>, usize, usize, usize, NdSbp, NdSbp);

/// An op's usable candidates, by reference, for interning.
type CandidateSet<'a> = (usize, &'a [NdSignature], &'a [usize]);

/// Interned candidate sets and cached tables while building.
struct Builder<'a> {
    graph: &'a SelectionGraph,
    config: &'a CostConfig,
    candidates: &'a [Vec<usize>],
    placement_ids: Vec<usize>,
    set_ids: Vec<usize>,
    boxing: HashMap<BoxingKey, f64>,
}

impl CostTables {
    /// Builds every table; costs are cached by (tensor, placements, candidate sets).
    pub fn build(graph: &SelectionGraph, config: &CostConfig) -> Result<Self> {
        let ops = graph.ops();
        let candidates: Vec<Vec<usize>> =
            ops.iter().map(OpNode::usable_candidates).collect::<Result<_>>()?;
        let placement_ids = intern(ops.iter().map(|op| &op.placement));
        let sets = ops.iter().zip(&candidates).zip(&placement_ids);
        let set_ids = intern(sets.map(|((op, usable), &placement)| -> CandidateSet<'_> {
            (placement, op.candidates.as_slice(), usable.as_slice())
        }));
        let mut builder = Builder {
            graph,
            config,
            candidates: &candidates,
            placement_ids,
            set_ids,
            boxing: HashMap::new(),
        };
        let ops = builder.op_tables();
        let edges = builder.edge_tables()?;
        Ok(CostTables { candidates, ops, edges })
    }
}

impl Builder<'_> {
    fn op_tables(&self) -> Vec<Arc<Vec<f64>>> {
        let mut cache = HashMap::new();
        let ops = self.graph.ops();
        (0..ops.len())
            .map(|index| {
                let op = &ops[index];
                let key = (self.set_ids[index], &op.inputs, &op.outputs, op.flops);
                let table = cache.entry(key).or_insert_with(|| {
                    let usable = self.candidates[index].iter();
                    let costs = usable.map(|&c| self.config.op_seconds(op, &op.candidates[c]));
                    Arc::new(costs.collect::<Vec<f64>>())
                });
                table.clone()
            })
            .collect()
    }

    fn edge_tables(&mut self) -> Result<Vec<Arc<Vec<f64>>>> {
        let graph = self.graph;
        let mut cache = HashMap::new();
        let mut tables = Vec::with_capacity(graph.edges().len());
        for edge in graph.edges() {
            let spec = &graph.op(edge.producer).outputs[edge.output];
            let key = (
                spec,
                self.set_ids[edge.producer.0],
                edge.output,
                self.set_ids[edge.consumer.0],
                edge.input,
            );
            let table = match cache.get(&key) {
                Some(table) => Arc::clone(table),
                None => {
                    let table = Arc::new(self.edge_table(edge)?);
                    cache.insert(key, Arc::clone(&table));
                    table
                }
            };
            tables.push(table);
        }
        Ok(tables)
    }

    fn edge_table(&mut self, edge: &super::graph::Edge) -> Result<Vec<f64>> {
        let producer = self.graph.op(edge.producer);
        let consumer = self.graph.op(edge.consumer);
        let spec = &producer.outputs[edge.output];
        let mut table = Vec::new();
        for &p in &self.candidates[edge.producer.0] {
            let from = &producer.candidates[p].outputs[edge.output];
            for &c in &self.candidates[edge.consumer.0] {
                let to = &consumer.candidates[c].inputs[edge.input];
                let key = (
                    spec.shape.clone(),
                    spec.dtype_size,
                    self.placement_ids[edge.producer.0],
                    self.placement_ids[edge.consumer.0],
                    from.clone(),
                    to.clone(),
                );
                let seconds = match self.boxing.get(&key) {
                    Some(&seconds) => seconds,
                    None => {
                        let source = Layout::new(producer.placement.clone(), from.clone());
                        let target = Layout::new(consumer.placement.clone(), to.clone());
                        let plan = plan_boxing(&spec.shape, spec.dtype_size, &source, &target)?;
                        let seconds = self.config.boxing_seconds(&plan);
                        self.boxing.insert(key, seconds);
                        seconds
                    }
                };
                table.push(seconds);
            }
        }
        Ok(table)
    }
}

/// A small id per distinct item, in order of first appearance.
fn intern<T: Eq + Hash>(items: impl Iterator<Item = T>) -> Vec<usize> {
    let mut ids = HashMap::new();
    items
        .map(|item| {
            let next = ids.len();
            *ids.entry(item).or_insert(next)
        })
        .collect()
}
