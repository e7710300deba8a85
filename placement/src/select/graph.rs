//! The graph that selection works on: ops with candidate nd-signatures and the edges between
//! them, with logical shapes, element sizes and user-fixed SBPs.

use crate::{list_text, nd_signatures, Error, NdSbp, NdSignature, Placement, Result, Signature};

/// An op of a [`SelectionGraph`], by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub usize);

/// The logical shape and element size of one tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Bytes per element.
    pub dtype_size: usize,
}

impl TensorSpec {
    /// A tensor spec from a shape and an element size.
    pub fn new(shape: impl Into<Vec<usize>>, dtype_size: usize) -> Self {
        TensorSpec { shape: shape.into(), dtype_size }
    }
}

/// One op: its placement, tensors, candidate nd-signatures, work and user-fixed SBPs.
#[derive(Clone, Debug)]
pub struct OpNode {
    /// Name used in reports and errors.
    pub name: String,
    /// Where it runs.
    pub placement: Placement,
    /// Logical inputs.
    pub inputs: Vec<TensorSpec>,
    /// Logical outputs.
    pub outputs: Vec<TensorSpec>,
    /// Candidate nd-signatures (one SBP per mesh axis of `placement` in each).
    pub candidates: Vec<NdSignature>,
    /// Floating-point operations of one logical forward run.
    pub flops: u64,
    /// SBPs the user fixed on inputs (`None`: free).
    pub fixed_inputs: Vec<Option<NdSbp>>,
    /// SBPs the user fixed on outputs (`None`: free).
    pub fixed_outputs: Vec<Option<NdSbp>>,
}

impl OpNode {
    /// An op whose candidates are the products over mesh axes of its 1-D `signatures`, each
    /// checked for arity and split axes against the tensors.
    pub fn new(
        name: impl Into<String>,
        placement: Placement,
        inputs: Vec<TensorSpec>,
        outputs: Vec<TensorSpec>,
        signatures: &[Signature],
        flops: u64,
    ) -> Result<Self> {
        let name = name.into();
        let input_ranks: Vec<usize> = inputs.iter().map(|t| t.shape.len()).collect();
        let output_ranks: Vec<usize> = outputs.iter().map(|t| t.shape.len()).collect();
        for signature in signatures {
            signature.check(&name, &input_ranks, &output_ranks, signatures)?;
        }
        let candidates = nd_signatures(signatures, placement.mesh_axes());
        Ok(OpNode {
            fixed_inputs: vec![None; inputs.len()],
            fixed_outputs: vec![None; outputs.len()],
            name,
            placement,
            inputs,
            outputs,
            candidates,
            flops,
        })
    }

    /// Fixes the nd-SBP of input `input` (the user's annotation).
    pub fn fix_input(mut self, input: usize, nd_sbp: impl Into<NdSbp>) -> Self {
        self.fixed_inputs[input] = Some(nd_sbp.into());
        self
    }

    /// Fixes the nd-SBP of output `output` (the user's annotation).
    pub fn fix_output(mut self, output: usize, nd_sbp: impl Into<NdSbp>) -> Self {
        self.fixed_outputs[output] = Some(nd_sbp.into());
        self
    }

    /// The positions of the candidates that agree with every fixed SBP; an error naming the op,
    /// its fixed SBPs and its candidates when none does, or when an nd-SBP does not fit the
    /// placement's mesh.
    pub fn usable_candidates(&self) -> Result<Vec<usize>> {
        let axes = self.placement.mesh_axes();
        let fixed = self.fixed_inputs.iter().chain(&self.fixed_outputs).flatten();
        let all = self.candidates.iter().flat_map(|c| c.inputs.iter().chain(&c.outputs));
        if let Some(wrong) = fixed.chain(all).find(|nd| nd.len() != axes) {
            return Err(Error::PlacementMismatch {
                op: self.name.clone(),
                inputs: self.fixed_text(),
                candidates: list_text(&self.candidates),
                reason: format!("{wrong} does not have one SBP per axis of {}", self.placement),
            });
        }
        let usable: Vec<usize> =
            (0..self.candidates.len()).filter(|&c| self.admits(&self.candidates[c])).collect();
        if usable.is_empty() {
            return Err(Error::NoSignature {
                op: self.name.clone(),
                inputs: self.fixed_text(),
                candidates: list_text(&self.candidates),
                reason: "no candidate agrees with the fixed SBPs".into(),
            });
        }
        Ok(usable)
    }

    fn admits(&self, candidate: &NdSignature) -> bool {
        let agrees = |fixed: &[Option<NdSbp>], actual: &[NdSbp]| {
            fixed.iter().zip(actual).all(|(f, a)| f.as_ref().is_none_or(|f| f == a))
        };
        agrees(&self.fixed_inputs, &candidate.inputs)
            && agrees(&self.fixed_outputs, &candidate.outputs)
    }

    /// The fixed input SBPs as text, `?` where free.
    pub fn fixed_text(&self) -> String {
        let texts: Vec<String> = self
            .fixed_inputs
            .iter()
            .map(|fixed| fixed.as_ref().map_or("?".to_string(), ToString::to_string))
            .collect();
        texts.join(", ")
    }
}

/// A producer output feeding a consumer input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    /// The producing op.
    pub producer: OpId,
    /// Which of its outputs.
    pub output: usize,
    /// The consuming op.
    pub consumer: OpId,
    /// Which of its inputs.
    pub input: usize,
}

/// Ops and edges; ops may be added in any order, [`SelectionGraph::topological_order`] sorts.
#[derive(Clone, Debug, Default)]
pub struct SelectionGraph {
    ops: Vec<OpNode>,
    edges: Vec<Edge>,
}

impl SelectionGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an op and returns its id.
    pub fn add_op(&mut self, op: OpNode) -> OpId {
        self.ops.push(op);
        OpId(self.ops.len() - 1)
    }

    /// Connects output `output` of `producer` to input `input` of `consumer`; their logical
    /// tensors must agree.
    pub fn connect(
        &mut self,
        producer: OpId,
        output: usize,
        consumer: OpId,
        input: usize,
    ) -> Result<()> {
        let from = self.ops.get(producer.0).and_then(|op| op.outputs.get(output));
        let to = self.ops.get(consumer.0).and_then(|op| op.inputs.get(input));
        match (from, to) {
            (Some(from), Some(to)) if from == to => {
                self.edges.push(Edge { producer, output, consumer, input });
                Ok(())
            }
            _ => Err(Error::Graph {
                reason: format!(
                    "cannot connect {producer:?} output {output} ({from:?}) to {consumer:?} \
                     input {input} ({to:?})"
                ),
            }),
        }
    }

    /// The ops, by id.
    pub fn ops(&self) -> &[OpNode] {
        &self.ops
    }

    /// The edges.
    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    /// The op with this id.
    pub fn op(&self, id: OpId) -> &OpNode {
        &self.ops[id.0]
    }

    /// The ops in an order where every producer comes before its consumers (Kahn's algorithm,
    /// ties by id); an error when the edges form a cycle.
    pub fn topological_order(&self) -> Result<Vec<OpId>> {
        let mut waiting = vec![0usize; self.ops.len()];
        let mut consumers = vec![Vec::new(); self.ops.len()];
        for edge in &self.edges {
            waiting[edge.consumer.0] += 1;
            consumers[edge.producer.0].push(edge.consumer.0);
        }
        let mut ready: Vec<usize> =
            (0..self.ops.len()).filter(|&op| waiting[op] == 0).rev().collect();
        let mut order = Vec::with_capacity(self.ops.len());
        while let Some(op) = ready.pop() {
            order.push(OpId(op));
            for &next in &consumers[op] {
                waiting[next] -= 1;
                if waiting[next] == 0 {
                    ready.push(next);
                }
            }
        }
        if order.len() != self.ops.len() {
            let stuck = (0..self.ops.len()).find(|&op| waiting[op] > 0).unwrap_or(0);
            return Err(Error::Graph {
                reason: format!("the edges form a cycle through op `{}`", self.ops[stuck].name),
            });
        }
        Ok(order)
    }
}
