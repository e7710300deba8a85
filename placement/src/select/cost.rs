//! The cost model: boxing bytes over bandwidth, compute split by parallelism, and memory.

use std::collections::HashMap;

use crate::{local_region, plan_boxing, BoxingPlan, Layout, NdSbp, NdSignature, Placement, Result};

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
    pub ops: Vec<Vec<f64>>,
    /// Seconds per edge, row-major over (producer candidate, consumer candidate).
    pub edges: Vec<Vec<f64>>,
}

/// A boxing request, for the cache of boxing costs.
type BoxingKey = (Vec<usize>, usize, usize, usize, NdSbp, NdSbp);

impl CostTables {
    /// Builds every table; boxing costs are cached by (tensor, placements, layouts).
    pub fn build(graph: &SelectionGraph, config: &CostConfig) -> Result<Self> {
        let ops = graph.ops();
        let candidates: Vec<Vec<usize>> =
            ops.iter().map(OpNode::usable_candidates).collect::<Result<_>>()?;
        let op_costs = ops
            .iter()
            .zip(&candidates)
            .map(|(op, usable)| {
                usable.iter().map(|&c| config.op_seconds(op, &op.candidates[c])).collect()
            })
            .collect();
        let mut placements: Vec<&Placement> = Vec::new();
        let mut placement_ids = Vec::with_capacity(ops.len());
        for op in ops {
            let id = placements.iter().position(|p| **p == op.placement).unwrap_or_else(|| {
                placements.push(&op.placement);
                placements.len() - 1
            });
            placement_ids.push(id);
        }
        let mut cache: HashMap<BoxingKey, f64> = HashMap::new();
        let mut edge_costs = Vec::with_capacity(graph.edges().len());
        for edge in graph.edges() {
            let producer = &ops[edge.producer.0];
            let consumer = &ops[edge.consumer.0];
            let spec = &producer.outputs[edge.output];
            let mut table = Vec::new();
            for &p in &candidates[edge.producer.0] {
                let from = &producer.candidates[p].outputs[edge.output];
                for &c in &candidates[edge.consumer.0] {
                    let to = &consumer.candidates[c].inputs[edge.input];
                    let key = (
                        spec.shape.clone(),
                        spec.dtype_size,
                        placement_ids[edge.producer.0],
                        placement_ids[edge.consumer.0],
                        from.clone(),
                        to.clone(),
                    );
                    let seconds = match cache.get(&key) {
                        Some(&seconds) => seconds,
                        None => {
                            let source = Layout::new(producer.placement.clone(), from.clone());
                            let target = Layout::new(consumer.placement.clone(), to.clone());
                            let plan = plan_boxing(&spec.shape, spec.dtype_size, &source, &target)?;
                            let seconds = config.boxing_seconds(&plan);
                            cache.insert(key, seconds);
                            seconds
                        }
                    };
                    table.push(seconds);
                }
            }
            edge_costs.push(table);
        }
        Ok(CostTables { candidates, ops: op_costs, edges: edge_costs })
    }
}
