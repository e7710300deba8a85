//! Reverse-mode autodiff on the logical graph: appends the backward nodes built by each op's
//! [`meshflow_ops::Op::backward`] (through `meshflow_ops::autodiff`), so gradients are ordinary
//! values of the same graph, placed and split like any other.
//!
//! Activation checkpointing: nodes built inside [`Graph::checkpoint`] form regions. With regions,
//! the backward is built run by run (a run: a region, or the nodes between two regions), last run
//! first; right before a region's backward, its forward is built again from the region's inputs
//! and that backward reads the recomputed values, so the region's activations die with its
//! forward. Every run's walk is seeded with the gradients that later runs gave its values and
//! inputs, so each gradient is summed in the same order as by one walk over the whole graph:
//! the gradients are bit for bit those without regions.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use meshflow_ops::autodiff::{gradients as walk, Node as WalkNode};
use meshflow_ops::{Tensor as HostTensor, Value};

use super::{Graph, GraphData, Source, Tensor, ValueInfo};
use crate::{Error, Result};

impl Graph {
    /// A constant of the graph: a value fixed at build time, broadcast to every device of
    /// `placement`.
    pub fn constant(
        &self,
        name: &str,
        value: HostTensor,
        placement: &meshflow_placement::Placement,
    ) -> Result<Tensor> {
        let mut data = self.data.borrow_mut();
        let info = ValueInfo {
            meta: value.meta().clone(),
            placement: placement.clone(),
            sbp: Some(meshflow_placement::NdSbp::broadcast(placement.hierarchy().len())),
            source: Source::Constant { value },
            name: Some(name.to_string()),
        };
        let id = data.push_value(info);
        Ok(Tensor::new(self.clone(), id))
    }

    /// Builds `forward` (typically a module's forward) as an activation-checkpointing region: the
    /// backward does not keep the activations made inside it but recomputes the region's forward
    /// from its inputs right before the region's backward (one more forward for less memory; see
    /// the module doc). Gradients are bit for bit those without the region. A region opened inside
    /// a region joins the outer one.
    ///
    /// ```
    /// # use meshflow::{Graph, ops::DType, placement::{DeviceType, Placement}};
    /// let graph = Graph::new();
    /// let placement = Placement::line(DeviceType::Cpu, 1)?;
    /// let x = graph.input("x", [2, 3], DType::F32, &placement, None)?;
    /// let y = graph.checkpoint(|| x.tanh()?.exp())?;
    /// assert_eq!(graph.data().nodes.iter().filter(|n| n.checkpoint.is_some()).count(), 2);
    /// # let _ = y;
    /// # Ok::<(), meshflow::Error>(())
    /// ```
    pub fn checkpoint<R>(&self, forward: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.data.borrow().checkpoint.is_some() {
            return forward();
        }
        let region = {
            let mut data = self.data.borrow_mut();
            data.checkpoints += 1;
            data.checkpoints - 1
        };
        self.in_checkpoint(Some(region), forward)
    }

    /// Runs `build` with the nodes it records in checkpointing region `region` (`None`: in none);
    /// micro-batches rebuild a region's nodes with it.
    pub(super) fn in_checkpoint<R>(&self, region: Option<u32>, build: impl FnOnce() -> R) -> R {
        let previous = std::mem::replace(&mut self.data.borrow_mut().checkpoint, region);
        let result = build();
        self.data.borrow_mut().checkpoint = previous;
        result
    }

    /// Appends the backward of `loss` (a scalar) and returns the gradient of each of `wrt`
    /// (`None` where `loss` does not depend on it). Checkpointing regions are recomputed (see
    /// [`Graph::checkpoint`]).
    pub fn gradients(&self, loss: &Tensor, wrt: &[&Tensor]) -> Result<Vec<Option<Tensor>>> {
        let meta = loss.meta();
        if meta.shape.numel() != 1 || !meta.dtype.is_float() {
            return Err(Error::Graph(format!(
                "gradients: the loss must be a float scalar, {} is {} {}",
                self.data().label(loss.value()),
                meta.shape,
                meta.dtype
            )));
        }
        let ones = HostTensor::full(meta.shape.clone(), 1.0, meta.dtype);
        let seed_name = format!("grad_seed.{}", loss.value().0);
        let seed = self.constant(&seed_name, ones, &loss.placement())?;
        let (nodes, regions): (Vec<WalkNode>, Vec<Option<u32>>) = self
            .data()
            .nodes
            .iter()
            .map(|n| {
                let node = WalkNode {
                    op: n.op.clone(),
                    inputs: n.inputs.clone(),
                    outputs: n.outputs.clone(),
                };
                (node, n.checkpoint)
            })
            .unzip();
        let wrt_values = wrt.iter().map(|t| self.own(t)).collect::<Result<Vec<_>>>()?;
        let (loss, seed) = (loss.value(), seed.value());
        let grads = if regions.iter().all(Option::is_none) {
            self.with_emit(|e| walk(e, &nodes, &[loss], &[seed], &wrt_values))?
        } else {
            let mut backward = RunBackward::new(&nodes, &wrt_values, loss, seed);
            for (region, range) in runs(&regions).into_iter().rev() {
                self.with_emit(|e| backward.run(e, &nodes[range], region.is_some()))?;
            }
            backward.result(&wrt_values)
        };
        Ok(grads.into_iter().map(|g| g.map(|v| Tensor::new(self.clone(), v))).collect())
    }
}

/// The runs of consecutive nodes in the same region (or in none), in order.
fn runs(regions: &[Option<u32>]) -> Vec<(Option<u32>, Range<usize>)> {
    let mut out: Vec<(Option<u32>, Range<usize>)> = Vec::new();
    for (index, region) in regions.iter().enumerate() {
        match out.last_mut() {
            Some((last, range)) if last == region => range.end = index + 1,
            _ => out.push((*region, index..index + 1)),
        }
    }
    out
}

/// The backward built run by run, last run first (see the module doc).
struct RunBackward<'a> {
    /// The values that depend on a value of `wrt` (the whole graph's).
    active: HashSet<Value>,
    /// The values gradients are asked for.
    wrt: &'a [Value],
    /// Gradients so far: of the loss, and what later runs gave their inputs.
    grads: HashMap<Value, Value>,
}

impl<'a> RunBackward<'a> {
    fn new(nodes: &[WalkNode], wrt: &'a [Value], loss: Value, seed: Value) -> Self {
        let mut active: HashSet<Value> = wrt.iter().copied().collect();
        for node in nodes {
            if node.inputs.iter().any(|v| active.contains(v)) {
                active.extend(node.outputs.iter().copied());
            }
        }
        RunBackward { active, wrt, grads: HashMap::from([(loss, seed)]) }
    }

    /// Appends the backward of `run`; when `recompute`, of its forward built again first.
    fn run(&mut self, e: &mut GraphData, run: &[WalkNode], recompute: bool) -> Result<()> {
        let produced: Vec<Value> = run.iter().flat_map(|n| n.outputs.iter().copied()).collect();
        let seeded: Vec<Value> =
            produced.iter().copied().filter(|v| self.grads.contains_key(v)).collect();
        if seeded.is_empty() {
            return Ok(());
        }
        let produced_set: HashSet<Value> = produced.iter().copied().collect();
        let mut targets: Vec<Value> = Vec::new();
        for v in run.iter().flat_map(|n| n.inputs.iter()) {
            if !produced_set.contains(v) && self.active.contains(v) && !targets.contains(v) {
                targets.push(*v);
            }
        }
        let externals = targets.len();
        targets.extend(produced.iter().copied().filter(|v| self.wrt.contains(v)));
        let (nodes, renamed) = if recompute { replay(e, run)? } else { (run.to_vec(), None) };
        let rename = |v: Value| renamed.as_ref().and_then(|m| m.get(&v)).copied().unwrap_or(v);
        // Seeds: gradients of the run's values from later runs, then those its inputs already
        // have, so that the walk adds this run's terms after them (one walk's order).
        let seeds: Vec<(Value, Value)> = (seeded.iter().map(|&v| (rename(v), self.grads[&v])))
            .chain(targets[..externals].iter().filter_map(|v| Some((*v, *self.grads.get(v)?))))
            .collect();
        let (outputs, cotangents): (Vec<Value>, Vec<Value>) = seeds.into_iter().unzip();
        let asked: Vec<Value> = targets.iter().map(|&v| rename(v)).collect();
        let grads = walk(e, &nodes, &outputs, &cotangents, &asked)?;
        for (value, grad) in targets.into_iter().zip(grads) {
            if let Some(grad) = grad {
                self.grads.insert(value, grad);
            }
        }
        Ok(())
    }

    fn result(&self, wrt: &[Value]) -> Vec<Option<Value>> {
        wrt.iter().map(|v| self.grads.get(v).copied()).collect()
    }
}

/// The forward of `run` built again on `e` from the same inputs (fixed SBPs kept), and the
/// original value → recomputed value map.
type Replayed = (Vec<WalkNode>, Option<HashMap<Value, Value>>);

fn replay(e: &mut GraphData, run: &[WalkNode]) -> Result<Replayed> {
    let mut renamed: HashMap<Value, Value> = HashMap::new();
    let mut nodes = Vec::with_capacity(run.len());
    for node in run {
        let inputs: Vec<Value> =
            node.inputs.iter().map(|v| renamed.get(v).copied().unwrap_or(*v)).collect();
        let outputs = e.apply(node.op.clone(), &inputs)?;
        for (old, new) in node.outputs.iter().zip(&outputs) {
            e.values[new.0 as usize].sbp = e.value(*old).sbp.clone();
            renamed.insert(*old, *new);
        }
        nodes.push(WalkNode { op: node.op.clone(), inputs, outputs });
    }
    Ok((nodes, Some(renamed)))
}
