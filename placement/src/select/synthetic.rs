//! Synthetic graphs for benchmarks and tests: a stack of transformer-like layers whose ops
//! carry the 1-D signatures of their real counterparts in `meshflow-ops`.

use crate::{Placement, Result, Sbp, Signature};

use super::graph::{OpId, OpNode, SelectionGraph, TensorSpec};

use Sbp::{Broadcast as B, PartialSum as P, Split as S};

/// Ops per layer of [`transformer`].
pub const OPS_PER_LAYER: usize = 20;

fn signature(inputs: &[Sbp], outputs: &[Sbp]) -> Signature {
    Signature::new(inputs.to_vec(), outputs.to_vec())
}

/// `a·b` for rank-2 `a`, `b`: rows, columns, contracted axis (partial), linearity in `P`.
pub fn matmul_signatures() -> Vec<Signature> {
    vec![
        signature(&[B, B], &[B]),
        signature(&[S(0), B], &[S(0)]),
        signature(&[B, S(1)], &[S(1)]),
        signature(&[S(1), S(0)], &[P]),
        signature(&[P, B], &[P]),
        signature(&[B, P], &[P]),
    ]
}

/// `a·bᵀ`: rows of `a`, rows of `b` (columns of the result), the shared axis (partial).
pub fn matmul_transposed_signatures() -> Vec<Signature> {
    vec![
        signature(&[B, B], &[B]),
        signature(&[S(0), B], &[S(0)]),
        signature(&[B, S(0)], &[S(1)]),
        signature(&[S(1), S(1)], &[P]),
    ]
}

/// A row-wise op (softmax, layer norm over the last axis): rows may be split.
pub fn row_signatures() -> Vec<Signature> {
    vec![signature(&[B], &[B]), signature(&[S(0)], &[S(0)])]
}

/// A non-linear element-wise op on a rank-2 tensor.
pub fn pointwise_signatures() -> Vec<Signature> {
    vec![signature(&[B], &[B]), signature(&[S(0)], &[S(0)]), signature(&[S(1)], &[S(1)])]
}

/// Element-wise addition of two rank-2 tensors (linear: partial sums add).
pub fn add_signatures() -> Vec<Signature> {
    vec![
        signature(&[B, B], &[B]),
        signature(&[S(0), S(0)], &[S(0)]),
        signature(&[S(1), S(1)], &[S(1)]),
        signature(&[P, P], &[P]),
    ]
}

/// A parameter or an input: broadcast or split on either axis.
pub fn source_signatures() -> Vec<Signature> {
    vec![signature(&[], &[B]), signature(&[], &[S(0)]), signature(&[], &[S(1)])]
}

/// `1 + layers ·` [`OPS_PER_LAYER`] ops: an input `[tokens, hidden]` (fixed split on rows
/// over every mesh axis when `data_parallel_input`), then per layer layer-norm, q/k/v
/// projections, scores `q·kᵀ`, softmax, context, output projection, residual add, layer-norm,
/// a 4× MLP with gelu, residual add; every weight is a source op.
pub fn transformer(
    placement: &Placement,
    layers: usize,
    tokens: usize,
    hidden: usize,
    data_parallel_input: bool,
) -> Result<SelectionGraph> {
    let mut builder = Builder { graph: SelectionGraph::new(), placement };
    let x = TensorSpec::new([tokens, hidden], 4);
    let sources = source_signatures();
    let mut node = OpNode::new("input", placement.clone(), vec![], vec![x], &sources, 0)?;
    if data_parallel_input {
        node = node.fix_output(0, crate::NdSbp::uniform(S(0), placement.mesh_axes()));
    }
    let mut input = builder.graph.add_op(node);
    for layer in 0..layers {
        input = builder.layer(layer, input, tokens, hidden)?;
    }
    Ok(builder.graph)
}

struct Builder<'a> {
    graph: SelectionGraph,
    placement: &'a Placement,
}

impl Builder<'_> {
    fn source(&mut self, name: &str, spec: &TensorSpec) -> Result<OpId> {
        let placement = self.placement.clone();
        let node =
            OpNode::new(name, placement, vec![], vec![spec.clone()], &source_signatures(), 0)?;
        Ok(self.graph.add_op(node))
    }

    fn op(
        &mut self,
        name: String,
        inputs: &[(OpId, &TensorSpec)],
        output: &TensorSpec,
        signatures: &[Signature],
        flops: usize,
    ) -> Result<OpId> {
        let specs = inputs.iter().map(|(_, spec)| (*spec).clone()).collect();
        let placement = self.placement.clone();
        let node =
            OpNode::new(name, placement, specs, vec![output.clone()], signatures, flops as u64)?;
        let id = self.graph.add_op(node);
        for (input, (producer, _)) in inputs.iter().enumerate() {
            self.graph.connect(*producer, 0, id, input)?;
        }
        Ok(id)
    }

    fn linear(&mut self, name: String, x: (OpId, &TensorSpec), out: usize) -> Result<OpId> {
        let [tokens, hidden] = [x.1.shape[0], x.1.shape[1]];
        let weight_spec = TensorSpec::new([hidden, out], 4);
        let weight = self.source(&format!("{name}.weight"), &weight_spec)?;
        let output = TensorSpec::new([tokens, out], 4);
        let flops = 2 * tokens * hidden * out;
        self.op(name, &[x, (weight, &weight_spec)], &output, &matmul_signatures(), flops)
    }

    fn layer(&mut self, layer: usize, x: OpId, tokens: usize, hidden: usize) -> Result<OpId> {
        let h = TensorSpec::new([tokens, hidden], 4);
        let wide = TensorSpec::new([tokens, 4 * hidden], 4);
        let square = TensorSpec::new([tokens, tokens], 4);
        let name = |op: &str| format!("layer{layer}.{op}");
        let rows = row_signatures();
        let norm = self.op(name("ln1"), &[(x, &h)], &h, &rows, 5 * tokens * hidden)?;
        let q = self.linear(name("q"), (norm, &h), hidden)?;
        let k = self.linear(name("k"), (norm, &h), hidden)?;
        let v = self.linear(name("v"), (norm, &h), hidden)?;
        let flops = 2 * tokens * tokens * hidden;
        let transposed = matmul_transposed_signatures();
        let scores = self.op(name("scores"), &[(q, &h), (k, &h)], &square, &transposed, flops)?;
        let probs =
            self.op(name("softmax"), &[(scores, &square)], &square, &rows, 5 * tokens * tokens)?;
        let context = self.op(
            name("context"),
            &[(probs, &square), (v, &h)],
            &h,
            &matmul_signatures(),
            flops,
        )?;
        let attention = self.linear(name("proj"), (context, &h), hidden)?;
        let adds = add_signatures();
        let residual =
            self.op(name("add1"), &[(x, &h), (attention, &h)], &h, &adds, tokens * hidden)?;
        let norm = self.op(name("ln2"), &[(residual, &h)], &h, &rows, 5 * tokens * hidden)?;
        let up = self.linear(name("fc1"), (norm, &h), 4 * hidden)?;
        let gelu = self.op(
            name("gelu"),
            &[(up, &wide)],
            &wide,
            &pointwise_signatures(),
            8 * tokens * hidden,
        )?;
        let down = self.linear(name("fc2"), (gelu, &wide), hidden)?;
        self.op(name("add2"), &[(residual, &h), (down, &h)], &h, &adds, tokens * hidden)
    }
}
