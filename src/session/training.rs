//! What a training session appends to the user's forward graph: micro-batches (gradient
//! accumulation), the backward, global-norm clipping and one fused optimizer update per
//! parameter, with the optimizer state optionally sharded over the data-parallel axis (ZeRO).

use meshflow_ops::ops::adamw::adamw;
use meshflow_ops::ops::sgd::sgd;
use meshflow_ops::Value;
use meshflow_placement::{Layout, NdSbp, Sbp};

use super::{Optimizer, SessionConfig, Training};
use crate::graph::{Graph, Init, NodeId, Source, Tensor, Unrolled};
use crate::{Error, Result};

/// A variable (by name) that takes a new value in the layout it lives in.
pub(super) type Assignment = (String, Value, Layout);

/// The graph a session compiles and how the user's values map into it.
pub(super) struct Built {
    /// The graph to compile (the user's, or its micro-batch rebuild).
    pub graph: Graph,
    /// The fetched values, in `graph`.
    pub fetches: Vec<Value>,
    /// Each input of the user's graph and the inputs of `graph` that receive its slices.
    pub inputs: Vec<(Value, Vec<Value>)>,
    /// The optimizer nodes (their op changes with the learning rate and step).
    pub updates: Vec<NodeId>,
    /// Variables written after each step.
    pub assigns: Vec<Assignment>,
    /// Micro-batches: the values summed over the pieces (the gradients and the loss).
    pub accumulate: Vec<Value>,
    /// The loss, whose writer ends the forward of a piece.
    pub forward: Option<Value>,
}

/// Builds the graph of an inference session: the user's graph as it is.
pub(super) fn inference(graph: &Graph, fetches: &[&Tensor]) -> Built {
    Built {
        graph: graph.clone(),
        fetches: fetches.iter().map(|t| t.value()).collect(),
        inputs: user_inputs(graph).into_iter().map(|v| (v, vec![v])).collect(),
        updates: Vec::new(),
        assigns: Vec::new(),
        accumulate: Vec::new(),
        forward: None,
    }
}

/// Builds the graph of a training session (see the module doc).
pub(super) fn training(
    graph: &Graph,
    fetches: &[&Tensor],
    training: &Training,
    config: &SessionConfig,
) -> Result<Built> {
    let count = config.micro_batches.max(1);
    let (mut built, mut grads, params) = if count == 1 {
        let params = parameters(graph);
        let refs: Vec<&Tensor> = params.iter().collect();
        let grads = graph.gradients(&training.loss, &refs)?;
        let mut built = inference(graph, fetches);
        built.forward = Some(training.loss.value());
        (built, grads, params)
    } else {
        accumulate(graph, fetches, training, count)?
    };
    if let Some(max_norm) = training.clip_grad_norm {
        clip_global_norm(&mut grads, max_norm)?;
    }
    for (param, grad) in params.iter().zip(grads) {
        let Some(grad) = grad else { continue };
        append_update(&mut built, param, &grad, &training.optimizer, config.zero_axis)?;
    }
    built.assigns.extend(built.graph.advance_step_counters()?);
    Ok(built)
}

/// The user's graph rebuilt for one of `count` micro-batches (the session runs it once per
/// piece), the gradients and the loss of `loss / count` summed over the pieces: the mean over
/// the micro-batches, as one step on the whole batch of a mean loss. The scale sits on the
/// piece's scalar loss, so the backward carries it into every gradient through the loss's
/// seed: scaling each summed gradient instead cost a kernel per parameter at the step's end
/// (the GPT on two micro-batches: 54 `mul_scalar` kernels, 0.7 ms of acts a step).
type Accumulated = (Built, Vec<Option<Tensor>>, Vec<Tensor>);

fn accumulate(
    graph: &Graph,
    fetches: &[&Tensor],
    training: &Training,
    count: usize,
) -> Result<Accumulated> {
    let mut piece = Unrolled::piece(&graph.snapshot(), count)?;
    let new = piece.graph.clone();
    let params = parameters(&new);
    let refs: Vec<&Tensor> = params.iter().collect();
    let share = piece.value(training.loss.value(), 0)?.mul_scalar(1.0 / count as f64)?;
    let grads = new.gradients(&share, &refs)?;
    let mut accumulated: Vec<Value> = grads.iter().flatten().map(Tensor::value).collect();
    accumulated.push(share.value());
    let mut fetched = Vec::with_capacity(fetches.len());
    for fetch in fetches {
        if fetch.value() == training.loss.value() {
            fetched.push(share.value());
        } else {
            fetched.push(piece.value(fetch.value(), 0)?.value());
        }
    }
    let inputs = piece
        .inputs
        .iter()
        .map(|(old, slices)| (*old, slices.iter().map(Tensor::value).collect()))
        .collect();
    let built = Built {
        graph: new,
        fetches: fetched,
        inputs,
        updates: Vec::new(),
        assigns: Vec::new(),
        accumulate: accumulated,
        forward: Some(share.value()),
    };
    Ok((built, grads, params))
}

/// Scales every gradient by `min(1, max_norm / (‖g‖ + 1e-6))` with `‖g‖` the 2-norm over all
/// of them (`torch.nn.utils.clip_grad_norm_`); the norm is summed across shards and stages.
fn clip_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<()> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Graph(format!("clip_grad_norm must be finite and > 0, got {max_norm}")));
    }
    let Some(home) = grads.iter().flatten().next().map(Tensor::placement) else {
        return Ok(());
    };
    let mut total: Option<Tensor> = None;
    for grad in grads.iter().flatten() {
        let axes: Vec<isize> = (0..grad.dims().len() as isize).collect();
        let mut squares = grad.mul(grad)?.sum(&axes, false)?;
        if squares.placement() != home {
            squares = squares.to_placement(&home, None)?;
        }
        total = Some(match total {
            None => squares,
            Some(t) => t.add(&squares)?,
        });
    }
    let Some(total) = total else { return Ok(()) };
    let ratio = total.sqrt()?.add_scalar(1e-6)?.pow_scalar(-1.0)?.mul_scalar(max_norm)?;
    // min(1, ratio) = 1 − relu(1 − ratio)
    let scale = ratio.neg()?.add_scalar(1.0)?.relu()?.neg()?.add_scalar(1.0)?;
    for grad in grads.iter_mut().flatten() {
        let placement = grad.placement();
        let local =
            if placement == home { scale.clone() } else { scale.to_placement(&placement, None)? };
        *grad = grad.mul(&local)?;
    }
    Ok(())
}

/// Appends `param`'s optimizer update and its state variables; with `zero_axis`, the state is
/// split on its axis 0 over that mesh axis where the parameter is broadcast there.
fn append_update(
    built: &mut Built,
    param: &Tensor,
    grad: &Tensor,
    optimizer: &Optimizer,
    zero_axis: Option<usize>,
) -> Result<()> {
    let graph = &built.graph;
    let name = graph.data().label(param.value());
    let placement = param.placement();
    let sbp = param.sbp().unwrap_or_else(|| NdSbp::broadcast(placement.mesh_axes()));
    let layout = Layout::new(placement.clone(), sbp.clone());
    let state_sbp = match zero_axis {
        Some(axis) => zero_sbp(&name, param, &sbp, axis)?,
        None => sbp.clone(),
    };
    let state_layout = Layout::new(placement.clone(), state_sbp.clone());
    let state = |suffix: &str| {
        let name = format!("{name}.{suffix}");
        let sbp = Some(state_sbp.clone());
        graph.parameter_init(&name, param.meta(), Init::ZEROS, &placement, sbp)
    };
    let (outputs, states) = match optimizer {
        Optimizer::AdamW(config) => {
            let (m, v) = (state("exp_avg")?, state("exp_avg_sq")?);
            let values = [param.value(), grad.value(), m.value(), v.value()];
            let outputs = graph.with_emit(|e| adamw(e, config.clone(), values))?;
            (outputs, vec![m, v])
        }
        Optimizer::Sgd(config) => {
            let buffer = state("momentum_buffer")?;
            let values = [param.value(), grad.value(), buffer.value()];
            let outputs = graph.with_emit(|e| sgd(e, config.clone(), values))?;
            (outputs, vec![buffer])
        }
    };
    let node = graph
        .data()
        .producer(outputs[0])
        .ok_or_else(|| Error::Graph(format!("the update of {name} has no node")))?;
    built.updates.push(node);
    built.assigns.push((name, outputs[0], layout));
    for (state, value) in states.iter().zip(&outputs[1..]) {
        built.assigns.push((graph.data().label(state.value()), *value, state_layout.clone()));
    }
    Ok(())
}

/// The optimizer-state layout of ZeRO: axis 0 split over mesh `axis` where the parameter is
/// broadcast on it (and has at least one row per device there).
fn zero_sbp(name: &str, param: &Tensor, sbp: &NdSbp, axis: usize) -> Result<NdSbp> {
    let hierarchy = param.placement().hierarchy().to_vec();
    let Some(&devices) = hierarchy.get(axis) else {
        return Err(Error::Graph(format!(
            "ZeRO axis {axis} does not exist: {name} is on a mesh of {} axes",
            hierarchy.len()
        )));
    };
    let rows = param.dims().first().copied().unwrap_or(0);
    let mut axes: Vec<Sbp> = sbp.axes().to_vec();
    if axes[axis] == Sbp::Broadcast && rows >= devices {
        axes[axis] = Sbp::Split(0);
    }
    Ok(NdSbp(axes))
}

/// The parameters of `graph`, in build order.
fn parameters(graph: &Graph) -> Vec<Tensor> {
    let data = graph.data();
    let values = data.values.iter().enumerate();
    values
        .filter(|(_, v)| matches!(v.source, Source::Parameter { .. }))
        .map(|(i, _)| Tensor::from_value(graph, Value(i as u32)))
        .collect()
}

/// The fed inputs of `graph`, in build order.
fn user_inputs(graph: &Graph) -> Vec<Value> {
    let data = graph.data();
    let values = data.values.iter().enumerate();
    values
        .filter(|(_, v)| matches!(v.source, Source::Input))
        .map(|(i, _)| Value(i as u32))
        .collect()
}
