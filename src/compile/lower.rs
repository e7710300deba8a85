//! Selection, boxing insertion and lowering (see the module doc of `compile`).

use std::collections::HashMap;
use std::sync::Arc;

use meshflow_ops::{OpRef, Shard, TensorMeta, Value};
use meshflow_placement::select::{
    select, OpId, OpNode, SelectionGraph, SelectionReport, TensorSpec,
};
use meshflow_placement::{
    local_region, plan_boxing, Layout, NdSbp, NdSignature, Placement, Sbp, Signature,
};

use super::{CompileConfig, Program, Slot, SlotInfo, Step};
use crate::graph::{GraphData, NodeId, Source};
use crate::{Error, Result};

/// A value the caller wants after the program ran: in its produced layout (`None`) or in a given
/// layout (a parameter's update boxed back to the parameter's layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The value.
    pub value: Value,
    /// The layout wanted, if any.
    pub layout: Option<Layout>,
}

/// Compiles `graph` for the `requests` (see the module doc of `compile`).
pub fn compile(graph: &GraphData, requests: &[Request], config: &CompileConfig) -> Result<Program> {
    let (mut selection_graph, ops_of) = selection_graph(graph)?;
    add_request_sinks(&mut selection_graph, graph, requests, &ops_of)?;
    let selection = select(&selection_graph, &config.cost, config.strategy)?;
    let mut lowering = Lowering::new(graph, &selection, &ops_of);
    lowering.leaves();
    for id in 0..graph.nodes.len() {
        lowering.node(NodeId(id as u32))?;
    }
    let requested = requests
        .iter()
        .map(|r| match &r.layout {
            None => Ok(lowering.produced[r.value.0 as usize]),
            Some(layout) => lowering.in_layout(r.value, layout.clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let ranks = graph.ranks();
    let frees = Program::last_uses(&lowering.steps, lowering.slots.len(), &requested);
    Ok(Program {
        graph: graph.clone(),
        frees,
        slots: lowering.slots,
        steps: lowering.steps,
        produced: lowering.produced,
        requested,
        ranks,
        selection,
    })
}

/// Where each value's producer sits in the selection graph: (op, output index).
type OpsOf = Vec<(OpId, usize)>;

fn spec(meta: &TensorMeta) -> TensorSpec {
    TensorSpec::new(meta.shape.dims().to_vec(), meta.dtype.size())
}

fn selection_graph(graph: &GraphData) -> Result<(SelectionGraph, OpsOf)> {
    let mut sg = SelectionGraph::new();
    let mut ops_of: Vec<Option<(OpId, usize)>> = vec![None; graph.values.len()];
    for (index, info) in graph.values.iter().enumerate() {
        let fixed = match (&info.source, &info.sbp) {
            (Source::Node { .. }, _) => continue,
            (_, Some(sbp)) => sbp.clone(),
            (Source::Input, None) => NdSbp(Vec::new()),
            (_, None) => NdSbp::broadcast(info.placement.mesh_axes()),
        };
        let rank = info.meta.shape.rank();
        let mut signatures: Vec<Signature> =
            (0..rank).map(|axis| Signature::new([], [Sbp::Split(axis)])).collect();
        signatures.push(Signature::new([], [Sbp::Broadcast]));
        let name = graph.label(Value(index as u32));
        let mut op = OpNode::new(
            name,
            info.placement.clone(),
            vec![],
            vec![spec(&info.meta)],
            &signatures,
            0,
        )?;
        if !fixed.is_empty() {
            op = op.fix_output(0, fixed);
        }
        ops_of[index] = Some((sg.add_op(op), 0));
    }
    for (index, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<TensorMeta> =
            node.inputs.iter().map(|v| graph.value(*v).meta.clone()).collect();
        let outputs: Vec<TensorMeta> =
            node.outputs.iter().map(|v| graph.value(*v).meta.clone()).collect();
        let signatures = node.op.signatures(&inputs);
        let name = format!("{}#{index}", node.op.name());
        let mut op = OpNode::new(
            name,
            node.placement.clone(),
            inputs.iter().map(spec).collect(),
            outputs.iter().map(spec).collect(),
            &signatures,
            node.op.flops(&inputs),
        )?;
        keep_localizable(graph, NodeId(index as u32), &mut op)?;
        for (o, value) in node.outputs.iter().enumerate() {
            if let Some(sbp) = &graph.value(*value).sbp {
                op = op.fix_output(o, sbp.clone());
            }
        }
        let id = sg.add_op(op);
        for (o, value) in node.outputs.iter().enumerate() {
            ops_of[value.0 as usize] = Some((id, o));
        }
        for (i, value) in node.inputs.iter().enumerate() {
            let (producer, output) = ops_of[value.0 as usize].ok_or_else(|| {
                Error::Graph(format!(
                    "{}: input {} is used before it is made",
                    node.op.name(),
                    graph.label(*value)
                ))
            })?;
            sg.connect(producer, output, id, i)?;
        }
    }
    let ops_of = ops_of
        .into_iter()
        .enumerate()
        .map(|(v, o)| o.ok_or_else(|| Error::Graph(format!("value %{v} has no producer"))))
        .collect::<Result<Vec<_>>>()?;
    Ok((sg, ops_of))
}

/// A sink per request with a layout: an op with the request's placement whose one input is fixed
/// to the request's SBP, so selection prices the boxing that the request adds (a parameter's
/// update boxed back to the parameter's layout, for instance) like any other edge's.
fn add_request_sinks(
    sg: &mut SelectionGraph,
    graph: &GraphData,
    requests: &[Request],
    ops_of: &OpsOf,
) -> Result<()> {
    for request in requests {
        let Some(layout) = &request.layout else { continue };
        let meta = &graph.value(request.value).meta;
        let rank = meta.shape.rank();
        let mut signatures: Vec<Signature> =
            (0..rank).map(|axis| Signature::new([Sbp::Split(axis)], [])).collect();
        signatures.push(Signature::new([Sbp::Broadcast], []));
        signatures.push(Signature::new([Sbp::PartialSum], []));
        let name = format!("request {}", graph.label(request.value));
        let sink =
            OpNode::new(name, layout.placement.clone(), vec![spec(meta)], vec![], &signatures, 0)?
                .fix_input(0, layout.nd_sbp.clone());
        let id = sg.add_op(sink);
        let (producer, output) = ops_of[request.value.0 as usize];
        sg.connect(producer, output, id, 0)?;
    }
    Ok(())
}

struct Lowering<'a> {
    graph: &'a GraphData,
    selection: &'a SelectionReport,
    ops_of: &'a OpsOf,
    slots: Vec<SlotInfo>,
    steps: Vec<Step>,
    produced: Vec<Slot>,
    by_layout: HashMap<(Value, Layout), Slot>,
}

impl<'a> Lowering<'a> {
    fn new(graph: &'a GraphData, selection: &'a SelectionReport, ops_of: &'a OpsOf) -> Self {
        let mut lowering = Lowering {
            graph,
            selection,
            ops_of,
            slots: Vec::new(),
            steps: Vec::new(),
            produced: Vec::with_capacity(graph.values.len()),
            by_layout: HashMap::new(),
        };
        for (index, &(op, output)) in ops_of.iter().enumerate() {
            let value = Value(index as u32);
            let info = graph.value(value);
            let sbp = lowering.signature(op).outputs[output].clone();
            let slot = lowering.slot(value, Layout::new(info.placement.clone(), sbp));
            lowering.produced.push(slot);
        }
        lowering
    }

    fn signature(&self, op: OpId) -> &'a NdSignature {
        &self.selection.ops[op.0].signature
    }

    fn slot(&mut self, value: Value, layout: Layout) -> Slot {
        let slot = Slot(self.slots.len() as u32);
        self.slots.push(SlotInfo { value, layout: layout.clone() });
        self.by_layout.insert((value, layout), slot);
        slot
    }

    fn leaves(&mut self) {
        for (index, info) in self.graph.values.iter().enumerate() {
            if !matches!(info.source, Source::Node { .. }) {
                let value = Value(index as u32);
                self.steps.push(Step::Leaf { value, slot: self.produced[index] });
            }
        }
    }

    /// The slot holding `value` in `layout`, adding a boxing step the first time.
    fn in_layout(&mut self, value: Value, layout: Layout) -> Result<Slot> {
        if let Some(slot) = self.by_layout.get(&(value, layout.clone())) {
            return Ok(*slot);
        }
        let from = self.produced[value.0 as usize];
        let source = self.slots[from.0 as usize].layout.clone();
        let meta = &self.graph.value(value).meta;
        let plan = plan_boxing(meta.shape.dims(), meta.dtype.size(), &source, &layout)?;
        if plan.is_identity() && source.placement == layout.placement {
            // The layouts differ only on mesh axes of size 1: every rank already holds it.
            self.by_layout.insert((value, layout), from);
            return Ok(from);
        }
        let to = self.slot(value, layout);
        self.steps.push(Step::Boxing { from, to, plan });
        Ok(to)
    }

    fn node(&mut self, id: NodeId) -> Result<()> {
        let node = self.graph.node(id);
        let (op_id, _) = self.ops_of[node.outputs[0].0 as usize];
        let signature = self.signature(op_id);
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for (i, value) in node.inputs.iter().enumerate() {
            let layout = Layout::new(node.placement.clone(), signature.inputs[i].clone());
            inputs.push(self.in_layout(*value, layout)?);
        }
        let outputs: Vec<Slot> = node.outputs.iter().map(|v| self.produced[v.0 as usize]).collect();
        let ops = self.localized(id, signature)?;
        self.steps.push(Step::Kernel { node: id, inputs, outputs, ops });
        Ok(())
    }

    /// The op each rank of the node's placement runs ([`localize_at`] on every device).
    fn localized(&self, id: NodeId, signature: &NdSignature) -> Result<Vec<OpRef>> {
        let placement = &self.graph.node(id).placement;
        (0..placement.size())
            .map(|index| {
                localize_at(self.graph, id, signature, &placement.coordinates_of_index(index))
            })
            .collect()
    }
}

/// The op the device at `coordinates` runs for node `id` under `signature`: `Op::localize` once
/// per mesh axis with that axis' 1-D signature and the exact nd shards, each call on the op the
/// previous one returned. An error when the op cannot run on that device's shards (a reshape
/// whose split the devices do not divide, say).
fn localize_at(
    graph: &GraphData,
    id: NodeId,
    signature: &NdSignature,
    coordinates: &[usize],
) -> Result<OpRef> {
    let node = graph.node(id);
    let placement = &node.placement;
    let shards = |values: &[Value], sbps: &[NdSbp]| {
        values
            .iter()
            .zip(sbps)
            .map(|(v, sbp)| shard(&graph.value(*v).meta, sbp, placement, coordinates))
            .collect::<Result<Vec<_>>>()
    };
    let inputs = shards(&node.inputs, &signature.inputs)?;
    let outputs = shards(&node.outputs, &signature.outputs)?;
    let mut op = Arc::clone(&node.op);
    for axis in 0..placement.mesh_axes() {
        if let Some(local) = op.localize(&signature.axis(axis), &inputs, &outputs)? {
            op = local;
        }
    }
    Ok(op)
}

/// Drops the candidates of node `id` that some device could not run (see [`localize_at`]), so
/// selection never chooses a layout that lowering would refuse. Splits are where shards differ,
/// so only candidates with a split are tried, on the corner devices of the mesh (first and last
/// index of every axis), where uneven shards show first; lowering still checks every device.
/// When no candidate is left, the first refusal is the error.
fn keep_localizable(graph: &GraphData, id: NodeId, op: &mut OpNode) -> Result<()> {
    let hierarchy = graph.node(id).placement.hierarchy().to_vec();
    if hierarchy.iter().all(|&size| size == 1) {
        return Ok(());
    }
    let corners: Vec<Vec<usize>> = (0..1usize << hierarchy.len())
        .map(|bits| {
            hierarchy
                .iter()
                .enumerate()
                .map(|(a, &n)| if bits >> a & 1 == 1 { n - 1 } else { 0 })
                .collect()
        })
        .collect();
    let mut refusal = None;
    op.candidates.retain(|candidate| {
        let sbps = candidate.inputs.iter().chain(&candidate.outputs);
        if !sbps.flat_map(|nd| &nd.0).any(|sbp| matches!(sbp, Sbp::Split(_))) {
            return true;
        }
        match corners.iter().try_for_each(|c| localize_at(graph, id, candidate, c).map(drop)) {
            Ok(()) => true,
            Err(error) => {
                refusal.get_or_insert(error);
                false
            }
        }
    });
    match refusal {
        Some(error) if op.candidates.is_empty() => Err(error),
        _ => Ok(()),
    }
}

/// The shard of a tensor of `meta` under `sbp` at `coordinates` of `placement`.
fn shard(
    meta: &TensorMeta,
    sbp: &NdSbp,
    placement: &Placement,
    coordinates: &[usize],
) -> Result<Shard> {
    let region = local_region(meta.shape.dims(), sbp, placement.hierarchy(), coordinates)?;
    Ok(Shard {
        local: TensorMeta::new(region.shape, meta.dtype),
        logical: meta.shape.clone(),
        offset: region.offsets,
    })
}
