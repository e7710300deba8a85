//! Micro-batches: one graph per training step that runs the forward and backward `k` times on
//! slices of the batch and sums the gradients (gradient accumulation; pipeline micro-batches).
//!
//! [`unroll`] rebuilds a graph: leaves that do not depend on the batch (parameters, constants)
//! and nodes that read none of the inputs are built once; every input becomes `k` inputs of a
//! `1/k` slice of its batch axis (axis 0, fed by the session from the whole batch), and every
//! node that depends on an input is built once per micro-batch. The caller appends each
//! micro-batch's backward right after its forward, so in program order micro-batch `i`'s
//! activations are dead before micro-batch `i + 1` starts.

use std::collections::HashMap;

use meshflow_ops::{Shape, TensorMeta, Value};

use super::{Graph, GraphData, Source, Tensor};
use crate::{Error, Result};

/// A graph rebuilt for micro-batches, and where the original's values went.
pub struct Unrolled {
    /// The rebuilt graph.
    pub graph: Graph,
    /// For each input of the original (by value): its micro-batch inputs in the new graph.
    pub inputs: Vec<(Value, Vec<Tensor>)>,
    /// Values built once (leaves and batch-independent nodes): original → new.
    shared: HashMap<Value, Value>,
    /// Batch-dependent values per micro-batch: original → new.
    per_batch: Vec<HashMap<Value, Value>>,
    /// Original nodes already rebuilt for micro-batch `i` (`built[i]` counts them).
    built: Vec<usize>,
    original: GraphData,
    /// How many slices each input's batch is cut into.
    divisor: usize,
}

impl Unrolled {
    /// The micro-batch count.
    pub fn count(&self) -> usize {
        self.per_batch.len()
    }

    /// `original` rebuilt for one micro-batch of `count`: every input holds `1/count` of its
    /// batch (axis 0) and every node is built once, as the session's actors run it once per
    /// piece. Nothing of the batch-dependent part is built yet (see [`Unrolled::value`] with
    /// batch 0).
    pub fn piece(original: &GraphData, count: usize) -> Result<Unrolled> {
        rebuild(original, count, 1)
    }

    /// `value` of the original graph in micro-batch `batch` of the new one (the shared value
    /// when it does not depend on the batch). Builds micro-batch `batch`'s nodes on first use,
    /// so calling it for batch 0, then 1, … appends each micro-batch's forward in turn.
    pub fn value(&mut self, value: Value, batch: usize) -> Result<Tensor> {
        self.build(batch)?;
        let new = self.per_batch[batch].get(&value).or_else(|| self.shared.get(&value));
        let new = new.copied().ok_or_else(|| {
            Error::Graph(format!("{} is not in the unrolled graph", self.original.label(value)))
        })?;
        Ok(Tensor::from_value(&self.graph, new))
    }

    /// True when `value` of the original depends on a fed input.
    pub fn depends_on_batch(&self, value: Value) -> bool {
        !self.shared.contains_key(&value)
    }

    fn build(&mut self, batch: usize) -> Result<()> {
        while self.built[batch] < self.original.nodes.len() {
            let index = self.built[batch];
            self.built[batch] += 1;
            let node = self.original.nodes[index].clone();
            if node.outputs.iter().all(|v| self.shared.contains_key(v)) {
                continue;
            }
            let inputs: Vec<Value> = node
                .inputs
                .iter()
                .map(|v| self.per_batch[batch].get(v).or_else(|| self.shared.get(v)).copied())
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Graph(format!("{}: input not rebuilt", node.op.name())))?;
            let node =
                super::random::micro_batch_node(&self.original, &self.graph, node, &inputs, batch)?;
            let outputs =
                self.graph.in_checkpoint(node.checkpoint, || self.replay(&node, &inputs))?;
            for (old, new) in node.outputs.iter().zip(outputs) {
                self.graph.fix_sbp(new, self.original.value(*old).sbp.clone());
                self.per_batch[batch].insert(*old, new);
            }
        }
        Ok(())
    }
}

impl Unrolled {
    /// Applies `node`'s op to one micro-batch's `inputs`. Ops that carry a shape (`reshape`,
    /// `broadcast_to`) carry the whole batch in its axis 0: they are rebuilt for the slice
    /// (values keep their batch on axis 0 through a model, as PyTorch's `view(-1, …)` assumes).
    fn replay(&self, node: &super::Node, inputs: &[Value]) -> Result<Vec<Value>> {
        let name = node.op.name();
        if !matches!(name, "reshape" | "broadcast_to") {
            return self.graph.with_emit(|e| e.apply(node.op.clone(), inputs));
        }
        let mut dims = self.original.value(node.outputs[0]).meta.shape.dims().to_vec();
        let count = self.divisor;
        match dims.first_mut() {
            Some(batch) if *batch % count == 0 => *batch /= count,
            _ => {
                return Err(Error::Graph(format!(
                    "{name} to {dims:?}: with {count} micro-batches its axis 0 must be the \
                     batch axis and divide by {count}"
                )))
            }
        }
        let shape = Shape::from(dims);
        let x = inputs[0];
        let value = self.graph.with_emit(|e| match name {
            "reshape" => meshflow_ops::ops::reshape::reshape(e, x, &shape),
            _ => meshflow_ops::ops::broadcast_to::broadcast_to(e, x, &shape),
        })?;
        Ok(vec![value])
    }
}

/// Rebuilds `original` for `count` micro-batches (see the module doc). Every input is split on
/// axis 0, which must divide by `count`; nothing of the batch-dependent part is built yet (see
/// [`Unrolled::value`]).
pub fn unroll(original: &GraphData, count: usize) -> Result<Unrolled> {
    rebuild(original, count, count)
}

/// `original` with inputs cut into `count` slices, of which `copies` get a graph.
fn rebuild(original: &GraphData, count: usize, copies: usize) -> Result<Unrolled> {
    if count == 0 {
        return Err(Error::Graph("micro-batch count must be at least 1".into()));
    }
    let graph = Graph::new();
    let mut shared = HashMap::new();
    let mut per_batch = vec![HashMap::new(); copies];
    let mut inputs = Vec::new();
    for (index, info) in original.values.iter().enumerate() {
        let old = Value(index as u32);
        let name = info.name.clone().unwrap_or_else(|| original.label(old));
        let sbp = info.sbp.clone();
        match &info.source {
            Source::Node { .. } => {}
            Source::Input => {
                let meta = slice_meta(&name, &info.meta, count)?;
                let mut slices = Vec::with_capacity(count);
                for (batch, map) in per_batch.iter_mut().enumerate() {
                    let slice_name =
                        if copies == 1 { name.clone() } else { format!("{name}@{batch}") };
                    let (shape, dtype) = (meta.shape.clone(), meta.dtype);
                    let t = graph.input(&slice_name, shape, dtype, &info.placement, sbp.clone())?;
                    map.insert(old, t.value());
                    slices.push(t);
                }
                inputs.push((old, slices));
            }
            Source::Parameter { init } => {
                let meta = info.meta.clone();
                let t = graph.parameter_init(&name, meta, init.clone(), &info.placement, sbp)?;
                shared.insert(old, t.value());
            }
            Source::Constant { value } => {
                let t = graph.constant(&name, value.clone(), &info.placement)?;
                shared.insert(old, t.value());
            }
        }
    }
    // Nodes that read no input are built once, now, in their original order.
    for node in &original.nodes {
        if node.inputs.iter().all(|v| shared.contains_key(v)) {
            let values: Vec<Value> = node.inputs.iter().map(|v| shared[v]).collect();
            let outputs = graph.with_emit(|e| e.apply(node.op.clone(), &values))?;
            for (old, new) in node.outputs.iter().zip(outputs) {
                graph.fix_sbp(new, original.value(*old).sbp.clone());
                shared.insert(*old, new);
            }
        }
    }
    Ok(Unrolled {
        graph,
        inputs,
        shared,
        per_batch,
        built: vec![0; copies],
        original: original.clone(),
        divisor: count,
    })
}

/// The meta of one of `count` slices of input `name` along axis 0.
fn slice_meta(name: &str, meta: &TensorMeta, count: usize) -> Result<TensorMeta> {
    let dims = meta.shape.dims();
    match dims.first() {
        Some(&batch) if batch % count == 0 => {
            let mut sliced = dims.to_vec();
            sliced[0] = batch / count;
            Ok(TensorMeta::new(Shape::from(sliced), meta.dtype))
        }
        Some(&batch) => Err(Error::Graph(format!(
            "input {name}: its batch axis (axis 0) has {batch} rows, which {count} micro-batches \
             do not divide"
        ))),
        None => Err(Error::Graph(format!(
            "input {name} is a scalar: micro-batches split inputs on axis 0"
        ))),
    }
}
