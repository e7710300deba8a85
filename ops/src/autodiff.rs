//! Reverse-mode automatic differentiation over a list of recorded nodes, generic over where the
//! gradient ops are built ([`Emit`]): the eager [`crate::eager::Tape`] uses it to compute
//! gradients in tests, a graph builder uses it to append the backward graph.
//!
//! Contract: `nodes` are in a topological order (every node after the nodes producing its
//! inputs, as recording them in emission order gives); each output value appears once.

use std::collections::{HashMap, HashSet};

use crate::ops::add::add;
use crate::{Emit, Error, OpRef, Result, Value};

/// One applied op: the op, its input values and its output values.
#[derive(Clone, Debug)]
pub struct Node {
    /// The op.
    pub op: OpRef,
    /// Its inputs.
    pub inputs: Vec<Value>,
    /// Its outputs.
    pub outputs: Vec<Value>,
}

/// Gradients of `Σ_k sum(outputs[k] · cotangents[k])` with respect to each of `wrt`, built on
/// `e` from the ops' [`crate::Op::backward`]. `None` where a value of `wrt` does not reach any
/// output. Gradients reaching one value along several paths are summed with `add`.
pub fn gradients(
    e: &mut dyn Emit,
    nodes: &[Node],
    outputs: &[Value],
    cotangents: &[Value],
    wrt: &[Value],
) -> Result<Vec<Option<Value>>> {
    if outputs.len() != cotangents.len() {
        return Err(Error::argument(
            "gradients",
            format!("{} outputs but {} cotangents", outputs.len(), cotangents.len()),
        ));
    }
    let active = depends_on(nodes, wrt);
    let mut grads: HashMap<Value, Value> = HashMap::new();
    for (&output, &cotangent) in outputs.iter().zip(cotangents) {
        check_meta(e, "cotangent", output, cotangent)?;
        accumulate(e, &mut grads, output, cotangent)?;
    }
    for node in nodes.iter().rev() {
        if !node.inputs.iter().any(|v| active.contains(v)) {
            continue;
        }
        let output_grads: Vec<Option<Value>> =
            node.outputs.iter().map(|v| grads.get(v).copied()).collect();
        if output_grads.iter().all(Option::is_none) {
            continue;
        }
        let needed: Vec<bool> = node.inputs.iter().map(|v| active.contains(v)).collect();
        let values = (&node.inputs[..], &node.outputs[..]);
        let input_grads = node.op.backward_needed(e, values, &output_grads, &needed)?;
        for (&input, grad) in node.inputs.iter().zip(input_grads) {
            if let (true, Some(grad)) = (active.contains(&input), grad) {
                check_meta(e, node.op.name(), input, grad)?;
                accumulate(e, &mut grads, input, grad)?;
            }
        }
    }
    Ok(wrt.iter().map(|v| grads.get(v).copied()).collect())
}

/// The values that depend on any of `roots` (the roots included).
fn depends_on(nodes: &[Node], roots: &[Value]) -> HashSet<Value> {
    let mut active: HashSet<Value> = roots.iter().copied().collect();
    for node in nodes {
        if node.inputs.iter().any(|v| active.contains(v)) {
            active.extend(node.outputs.iter().copied());
        }
    }
    active
}

fn accumulate(
    e: &mut dyn Emit,
    grads: &mut HashMap<Value, Value>,
    value: Value,
    grad: Value,
) -> Result<()> {
    let total = match grads.get(&value) {
        Some(&previous) => add(e, previous, grad)?,
        None => grad,
    };
    grads.insert(value, total);
    Ok(())
}

/// A gradient must have its value's shape and dtype; a mismatch is a bug in `op`'s backward.
fn check_meta(e: &mut dyn Emit, op: &'static str, value: Value, grad: Value) -> Result<()> {
    let (want, got) = (e.meta(value), e.meta(grad));
    if want == got {
        return Ok(());
    }
    Err(Error::Shape {
        op,
        shapes: vec![want.shape, got.shape],
        reason: format!("gradient is {} but its value is {}", got.dtype, want.dtype),
    })
}
