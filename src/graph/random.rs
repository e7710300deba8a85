//! Randomness that follows the training: a step counter per placement (a variable the training
//! session advances after every step), which random ops such as dropout read so that their masks
//! change with the step, and the offset of a micro-batch in its batch, which such ops add to
//! their logical indices so that micro-batches draw what the whole batch would.

use meshflow_ops::{OpRef, Shape, Shard, TensorMeta, Value};
use meshflow_placement::{Layout, NdSbp, Placement, Sbp, Signature};

use super::{Graph, GraphData, Init, Node, NodeId, Source, Tensor};
use crate::{Error, Result};

/// The name prefix of the step counters (`rng.step.0`, `rng.step.1`, … one per placement).
pub const STEP_COUNTER: &str = "rng.step.";

impl Graph {
    /// The step counter of `placement`: an f64 `[1]` variable, replicated, that starts at 0 and
    /// that a training session advances by one after every step (an inference session leaves
    /// it). It is saved and loaded with the other variables, so a resumed run draws the masks
    /// the uninterrupted run would.
    pub fn step_counter(&self, placement: &Placement) -> Result<Tensor> {
        let counters = self.step_counters();
        if let Some(counter) = counters.iter().find(|c| &c.placement() == placement) {
            return Ok(counter.clone());
        }
        let meta = TensorMeta::new(vec![1], meshflow_ops::DType::F64);
        let name = format!("{STEP_COUNTER}{}", counters.len());
        let sbp = Some(NdSbp::broadcast(placement.mesh_axes()));
        self.parameter_init(&name, meta, Init::ZEROS, placement, sbp)
    }

    /// The step counters of the graph.
    pub fn step_counters(&self) -> Vec<Tensor> {
        let data = self.data();
        let counters = data.values.iter().enumerate().filter(|(_, info)| {
            matches!(info.source, Source::Parameter { .. })
                && info.name.as_deref().is_some_and(|n| n.starts_with(STEP_COUNTER))
        });
        counters.map(|(index, _)| Tensor::new(self.clone(), Value(index as u32))).collect()
    }

    /// For a training session: each step counter's name, its value plus one (appended to the
    /// graph) and the layout it is written back in after the step.
    pub fn advance_step_counters(&self) -> Result<Vec<(String, Value, Layout)>> {
        let mut out = Vec::new();
        for counter in self.step_counters() {
            let name = self.data().label(counter.value());
            let placement = counter.placement();
            let layout = Layout::new(placement.clone(), NdSbp::broadcast(placement.mesh_axes()));
            out.push((name, counter.add_scalar(1.0)?.value(), layout));
        }
        Ok(out)
    }
}

/// The op of a node rebuilt for micro-batch `batch` (inputs `local`, of the whole batch's
/// `logical` inputs): a random op ([`meshflow_ops::Op::is_stateful`]) learns where the slice
/// sits in the batch (through [`meshflow_ops::Op::localize`] on the axis whose size differs), so
/// it draws the numbers of those logical elements; any other op is kept.
pub(super) fn at_micro_batch(
    op: &OpRef,
    logical: &[TensorMeta],
    local: &[TensorMeta],
    batch: usize,
) -> Result<OpRef> {
    if !op.is_stateful() {
        return Ok(op.clone());
    }
    let shard = |(whole, part): (&TensorMeta, &TensorMeta)| -> Result<Shard> {
        let (dims, local_dims) = (whole.shape.dims(), part.shape.dims());
        let mut offset = vec![0; dims.len()];
        let sliced: Vec<usize> =
            (0..dims.len()).filter(|&k| local_dims.get(k) != Some(&dims[k])).collect();
        match sliced[..] {
            [] => {}
            [axis] if dims.len() == local_dims.len() => offset[axis] = batch * local_dims[axis],
            _ => {
                return Err(Error::Graph(format!(
                    "{}: a micro-batch of {} is {} (sliced on more than one axis)",
                    op.name(),
                    whole.shape,
                    part.shape
                )))
            }
        }
        let logical = Shape::from(dims.to_vec());
        Ok(Shard { local: part.clone(), logical, offset })
    };
    let shards = logical.iter().zip(local).map(shard).collect::<Result<Vec<_>>>()?;
    let signature = Signature::new(vec![Sbp::Split(0); shards.len()], [Sbp::Split(0)]);
    let outputs = shards.first().cloned().into_iter().collect::<Vec<_>>();
    Ok(op.localize(&signature, &shards, &outputs)?.unwrap_or_else(|| op.clone()))
}

/// The op a kernel runs for piece `piece` of `pieces` (micro-batches that run one piece graph
/// one after another, see [`super::Unrolled::piece`]): a random op learns where the piece sits
/// in the whole batch, `piece × rows` on axis 0 of its first input (`rows`: that axis in
/// `graph`), through [`meshflow_ops::Op::localize`]; any other op is itself.
pub fn for_piece(
    op: &OpRef,
    graph: &GraphData,
    node: NodeId,
    piece: u32,
    pieces: u32,
) -> Result<OpRef> {
    let Some(&first) = graph.node(node).inputs.first() else {
        return Ok(op.clone());
    };
    let meta = &graph.value(first).meta;
    if piece == 0 || !op.is_stateful() || meta.shape.rank() == 0 {
        return Ok(op.clone());
    }
    let mut whole = meta.shape.dims().to_vec();
    let mut offset = vec![0; whole.len()];
    offset[0] = piece as usize * whole[0];
    whole[0] *= pieces as usize;
    let shard = Shard { local: meta.clone(), logical: Shape::from(whole), offset };
    let signature = Signature::new([Sbp::Split(0)], [Sbp::Split(0)]);
    let shards = std::slice::from_ref(&shard);
    Ok(op.localize(&signature, shards, shards)?.unwrap_or_else(|| op.clone()))
}

/// `node` of `original` as rebuilt for micro-batch `batch` on `rebuilt` from `inputs` (its op
/// through [`at_micro_batch`]).
pub(super) fn micro_batch_node(
    original: &GraphData,
    rebuilt: &Graph,
    mut node: Node,
    inputs: &[Value],
    batch: usize,
) -> Result<Node> {
    let metas = |data: &GraphData, values: &[Value]| -> Vec<TensorMeta> {
        values.iter().map(|v| data.value(*v).meta.clone()).collect()
    };
    let (logical, local) = (metas(original, &node.inputs), metas(&rebuilt.data(), inputs));
    node.op = at_micro_batch(&node.op, &logical, &local, batch)?;
    Ok(node)
}
