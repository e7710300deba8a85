//! Choosing one candidate per op: greedy in topological order, and a global search
//! (dynamic programming, exact on in-trees and chains, then coordinate descent over the whole
//! DAG), which keeps the best of its starts and the greedy answer, so it is never worse.

use super::cost::CostTables;
use super::graph::SelectionGraph;

/// For every op, the position of its choice among its usable candidates.
pub(crate) type Choice = Vec<usize>;

/// The edges into and out of each op.
pub(crate) struct Adjacency {
    order: Vec<usize>,
    inputs: Vec<Vec<usize>>,
    outputs: Vec<Vec<usize>>,
    producers: Vec<usize>,
    consumers: Vec<usize>,
}

impl Adjacency {
    /// The adjacency of `graph` with its topological `order`.
    pub fn new(graph: &SelectionGraph, order: Vec<usize>) -> Self {
        let count = graph.ops().len();
        let mut inputs = vec![Vec::new(); count];
        let mut outputs = vec![Vec::new(); count];
        for (index, edge) in graph.edges().iter().enumerate() {
            inputs[edge.consumer.0].push(index);
            outputs[edge.producer.0].push(index);
        }
        let producers = graph.edges().iter().map(|edge| edge.producer.0).collect();
        let consumers = graph.edges().iter().map(|edge| edge.consumer.0).collect();
        Adjacency { order, inputs, outputs, producers, consumers }
    }
}

/// Seconds of edge `edge` for producer position `from` and consumer position `to`.
fn edge_cost(
    tables: &CostTables,
    adjacency: &Adjacency,
    edge: usize,
    from: usize,
    to: usize,
) -> f64 {
    let width = tables.candidates[adjacency.consumers[edge]].len();
    tables.edges[edge][from * width + to]
}

/// The cost of a whole assignment.
pub(crate) fn total_cost(tables: &CostTables, adjacency: &Adjacency, choice: &[usize]) -> f64 {
    let ops: f64 = choice.iter().enumerate().map(|(op, &c)| tables.ops[op][c]).sum();
    let edges: f64 = (0..tables.edges.len())
        .map(|edge| {
            let from = choice[adjacency.producers[edge]];
            let to = choice[adjacency.consumers[edge]];
            edge_cost(tables, adjacency, edge, from, to)
        })
        .sum();
    ops + edges
}

/// The position minimising `cost`, the first on ties.
fn argmin(count: usize, cost: impl Fn(usize) -> f64) -> (usize, f64) {
    (0..count).map(|c| (c, cost(c))).fold((0, f64::INFINITY), |best, next| {
        if next.1 < best.1 {
            next
        } else {
            best
        }
    })
}

/// Each op in topological order takes the candidate cheapest given its producers' choices.
pub(crate) fn greedy(tables: &CostTables, adjacency: &Adjacency) -> Choice {
    let mut choice = vec![0; tables.ops.len()];
    for &op in &adjacency.order {
        let (best, _) = argmin(tables.ops[op].len(), |c| {
            let inputs = adjacency.inputs[op].iter().map(|&edge| {
                let from = choice[adjacency.producers[edge]];
                edge_cost(tables, adjacency, edge, from, c)
            });
            tables.ops[op][c] + inputs.sum::<f64>()
        });
        choice[op] = best;
    }
    choice
}

/// Dynamic programming in topological order: the best upstream cost of every op and
/// candidate, then a backward pass where each producer takes the choice its first consumer
/// wanted. Exact when every op has at most one consumer (chains, in-trees).
pub(crate) fn dynamic_programming(tables: &CostTables, adjacency: &Adjacency) -> Choice {
    let count = tables.ops.len();
    let mut best: Vec<Vec<f64>> = tables.ops.iter().map(|costs| costs.to_vec()).collect();
    let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); tables.edges.len()];
    for &op in &adjacency.order {
        for &edge in &adjacency.inputs[op] {
            let producer = adjacency.producers[edge];
            let choices: Vec<(usize, f64)> = (0..tables.ops[op].len())
                .map(|c| {
                    argmin(tables.ops[producer].len(), |p| {
                        best[producer][p] + edge_cost(tables, adjacency, edge, p, c)
                    })
                })
                .collect();
            for (c, &(_, cost)) in choices.iter().enumerate() {
                best[op][c] += cost;
            }
            wanted[edge] = choices.into_iter().map(|(p, _)| p).collect();
        }
    }
    let mut choice: Vec<Option<usize>> = vec![None; count];
    for &op in adjacency.order.iter().rev() {
        let own = *choice[op].get_or_insert_with(|| argmin(best[op].len(), |c| best[op][c]).0);
        for &edge in &adjacency.inputs[op] {
            let producer = adjacency.producers[edge];
            choice[producer].get_or_insert(wanted[edge][own]);
        }
    }
    choice.into_iter().map(|c| c.unwrap_or(0)).collect()
}

/// Coordinate descent: each op in turn takes the candidate cheapest given all its neighbours,
/// until a round changes nothing or `rounds` run out.
pub(crate) fn improve(
    tables: &CostTables,
    adjacency: &Adjacency,
    mut choice: Choice,
    rounds: usize,
) -> Choice {
    for _ in 0..rounds {
        let mut changed = false;
        for &op in &adjacency.order {
            let local = |c: usize| {
                let inputs = adjacency.inputs[op].iter().map(|&edge| {
                    edge_cost(tables, adjacency, edge, choice[adjacency.producers[edge]], c)
                });
                let outputs = adjacency.outputs[op].iter().map(|&edge| {
                    edge_cost(tables, adjacency, edge, c, choice[adjacency.consumers[edge]])
                });
                tables.ops[op][c] + inputs.sum::<f64>() + outputs.sum::<f64>()
            };
            let current = local(choice[op]);
            let (best, cost) = argmin(tables.ops[op].len(), local);
            if cost < current - current.abs() * 1e-12 {
                choice[op] = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    choice
}

/// The global search: the cheapest of greedy, greedy improved, and dynamic programming
/// improved.
pub(crate) fn search(tables: &CostTables, adjacency: &Adjacency, rounds: usize) -> Choice {
    let start = greedy(tables, adjacency);
    let candidates = [
        improve(tables, adjacency, dynamic_programming(tables, adjacency), rounds),
        improve(tables, adjacency, start.clone(), rounds),
        start,
    ];
    let costs: Vec<f64> =
        candidates.iter().map(|choice| total_cost(tables, adjacency, choice)).collect();
    let (best, _) = argmin(costs.len(), |i| costs[i]);
    candidates.into_iter().nth(best).unwrap_or_default()
}
