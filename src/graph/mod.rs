//! The logical graph a training script builds, as if for one device.
//!
//! A [`Graph`] holds values (inputs, parameters, op outputs) and nodes (ops applied to values).
//! Every value has a placement and, optionally, an nd-SBP fixed by the user; the compiler
//! chooses the rest. [`Tensor`] is the handle a script holds: a value of one graph. Ops are applied
//! through the [`meshflow_ops::Emit`] contract, so an op's constructor function and its gradient
//! work the same on this graph as on the eager tape of the op tests.
//!
//! Errors name the op, the shapes, the dtypes and the layouts, at build time.

mod autodiff;
mod init;
mod methods;
mod micro_batch;
mod random;
mod tensor;
mod to_layout;

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use meshflow_ops::{Emit, OpRef, Shape, TensorMeta, Value};
use meshflow_placement::{NdSbp, Placement};

pub use init::Init;
pub use micro_batch::{unroll, Unrolled};
pub use random::{for_piece, STEP_COUNTER};
pub use tensor::Tensor;
pub use to_layout::ToLayout;

use crate::{Error, Result};

/// Index of a node in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// Where a value comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Fed by the user at every step.
    Input,
    /// A trainable parameter (a variable): initialised once, read by every step, updated after it.
    Parameter {
        /// Its initial value, materialised shard by shard.
        init: Init,
    },
    /// A value fixed when the graph is built, broadcast to every device.
    Constant {
        /// The value.
        value: meshflow_ops::Tensor,
    },
    /// The `output`-th output of node `node`.
    Node {
        /// The producing node.
        node: NodeId,
        /// Which of its outputs.
        output: usize,
    },
}

/// What the graph knows of one value.
#[derive(Clone, Debug)]
pub struct ValueInfo {
    /// Logical shape and dtype.
    pub meta: TensorMeta,
    /// The devices it lives on.
    pub placement: Placement,
    /// The nd-SBP fixed by the user, if any; otherwise the compiler chooses.
    pub sbp: Option<NdSbp>,
    /// Where it comes from.
    pub source: Source,
    /// A name for reports, checkpoints and errors (inputs and parameters always have one).
    pub name: Option<String>,
}

/// One op applied to values.
#[derive(Clone, Debug)]
pub struct Node {
    /// The op.
    pub op: OpRef,
    /// Its input values.
    pub inputs: Vec<Value>,
    /// Its output values.
    pub outputs: Vec<Value>,
    /// The devices it runs on (all its inputs live there).
    pub placement: Placement,
    /// The activation-checkpointing region it was built in ([`Graph::checkpoint`]), if any: a
    /// region is a maximal run of consecutive nodes with the same id, whose forward the backward
    /// recomputes instead of keeping its activations.
    pub checkpoint: Option<u32>,
}

/// The data of a graph: values and nodes in the order they were built (a topological order).
#[derive(Clone, Debug, Default)]
pub struct GraphData {
    /// Every value.
    pub values: Vec<ValueInfo>,
    /// Every node, in build order.
    pub nodes: Vec<Node>,
    /// The checkpointing region new nodes are recorded in.
    checkpoint: Option<u32>,
    /// Checkpointing regions opened so far (the next region's id).
    checkpoints: u32,
}

impl GraphData {
    /// The info of `value`.
    pub fn value(&self, value: Value) -> &ValueInfo {
        &self.values[value.0 as usize]
    }

    /// Every rank some value is placed on, sorted, each once.
    pub fn ranks(&self) -> Vec<usize> {
        let mut ranks: Vec<usize> =
            self.values.iter().flat_map(|v| v.placement.ranks().to_vec()).collect();
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }

    /// The node with id `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    /// The node that produces `value`, if a node does.
    pub fn producer(&self, value: Value) -> Option<NodeId> {
        match self.value(value).source {
            Source::Node { node, .. } => Some(node),
            _ => None,
        }
    }

    /// A label for errors: the value's name, or `%<index>` with its producer's op.
    pub fn label(&self, value: Value) -> String {
        let info = self.value(value);
        match (&info.name, &info.source) {
            (Some(name), _) => name.clone(),
            (None, Source::Node { node, .. }) => {
                format!("%{} ({})", value.0, self.node(*node).op.name())
            }
            (None, _) => format!("%{}", value.0),
        }
    }

    fn push_value(&mut self, info: ValueInfo) -> Value {
        self.values.push(info);
        Value(self.values.len() as u32 - 1)
    }

    /// Records `op` on `inputs` after checking placements and inferring outputs.
    fn apply(&mut self, op: OpRef, inputs: &[Value]) -> Result<Vec<Value>> {
        let placement = self.common_placement(op.name(), inputs)?;
        let placement = op.output_placement().cloned().unwrap_or(placement);
        let metas: Vec<TensorMeta> = inputs.iter().map(|v| self.value(*v).meta.clone()).collect();
        let out_metas = op.infer(&metas)?;
        let node = NodeId(self.nodes.len() as u32);
        let outputs: Vec<Value> = out_metas
            .into_iter()
            .enumerate()
            .map(|(output, meta)| {
                self.push_value(ValueInfo {
                    meta,
                    placement: placement.clone(),
                    sbp: None,
                    source: Source::Node { node, output },
                    name: None,
                })
            })
            .collect();
        let checkpoint = self.checkpoint;
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            placement,
            checkpoint,
        });
        Ok(outputs)
    }

    fn common_placement(&self, op: &'static str, inputs: &[Value]) -> Result<Placement> {
        let Some(first) = inputs.first() else {
            return Err(Error::Graph(format!("{op}: an op needs at least one input to place it")));
        };
        let placement = &self.value(*first).placement;
        for value in &inputs[1..] {
            let other = &self.value(*value).placement;
            if other != placement {
                return Err(Error::Graph(format!(
                    "{op}: inputs on different placements: {} on {placement}, {} on {other}; \
                     move one with to_placement",
                    self.label(*first),
                    self.label(*value)
                )));
            }
        }
        Ok(placement.clone())
    }
}

impl Emit for GraphData {
    fn meta(&self, value: Value) -> TensorMeta {
        self.value(value).meta.clone()
    }

    fn emit(&mut self, op: OpRef, inputs: &[Value]) -> meshflow_ops::Result<Vec<Value>> {
        self.apply(op, inputs).map_err(|e| match e {
            Error::Ops(inner) => inner,
            other => meshflow_ops::Error::Argument { op: "graph", reason: other.to_string() },
        })
    }
}

/// A logical graph under construction, shared by the [`Tensor`] handles built on it.
#[derive(Clone, Default)]
pub struct Graph {
    data: Rc<RefCell<GraphData>>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Graph::default()
    }

    /// A user-fed input of the given logical shape and dtype, on `placement`, with an optional
    /// fixed nd-SBP (one SBP per mesh axis of the placement).
    pub fn input(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        dtype: meshflow_ops::DType,
        placement: &Placement,
        sbp: Option<NdSbp>,
    ) -> Result<Tensor> {
        let meta = TensorMeta::new(shape, dtype);
        self.leaf(name, meta, placement, sbp, Source::Input)
    }

    /// A trainable parameter initialised to `init` (its logical value), on `placement`.
    pub fn parameter(
        &self,
        name: &str,
        init: meshflow_ops::Tensor,
        placement: &Placement,
        sbp: Option<NdSbp>,
    ) -> Result<Tensor> {
        let meta = init.meta().clone();
        self.parameter_init(name, meta, Init::Value(init), placement, sbp)
    }

    /// A trainable parameter of logical `meta` whose first value `init` describes; each device
    /// materialises only its shard, so nothing of the size of the whole is allocated here.
    pub fn parameter_init(
        &self,
        name: &str,
        meta: TensorMeta,
        init: Init,
        placement: &Placement,
        sbp: Option<NdSbp>,
    ) -> Result<Tensor> {
        init.check(name, &meta)?;
        self.leaf(name, meta, placement, sbp, Source::Parameter { init })
    }

    /// Moves `x` to `placement` (a pipeline stage boundary), optionally fixing its nd-SBP there;
    /// the gradient moves back the same way.
    pub fn to_layout(
        &self,
        x: &Tensor,
        placement: &Placement,
        sbp: Option<NdSbp>,
    ) -> Result<Tensor> {
        let meta = x.meta();
        let name = self.data().label(x.value());
        if let Some(sbp) = &sbp {
            check_sbp(&name, &meta.shape, placement, sbp)?;
        }
        let op = ToLayout { source: x.placement(), target: placement.clone() };
        let moved = x.emit_with(|e| meshflow_ops::emit1(e, op, &[x.value()]))?;
        self.fix_sbp(moved.value(), sbp);
        Ok(moved)
    }

    fn leaf(
        &self,
        name: &str,
        meta: TensorMeta,
        placement: &Placement,
        sbp: Option<NdSbp>,
        source: Source,
    ) -> Result<Tensor> {
        if let Some(sbp) = &sbp {
            check_sbp(name, &meta.shape, placement, sbp)?;
        }
        let mut data = self.data.borrow_mut();
        if data.values.iter().any(|v| v.name.as_deref() == Some(name)) {
            return Err(Error::Graph(format!("a value named {name:?} already exists")));
        }
        let info =
            ValueInfo { meta, placement: placement.clone(), sbp, source, name: Some(name.into()) };
        let value = data.push_value(info);
        Ok(Tensor::new(self.clone(), value))
    }

    /// Applies `op` to `inputs` (handles of this graph) and returns its outputs.
    pub fn apply(&self, op: OpRef, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let values = inputs.iter().map(|t| self.own(t)).collect::<Result<Vec<_>>>()?;
        let outputs = self.data.borrow_mut().apply(op, &values)?;
        Ok(outputs.into_iter().map(|v| Tensor::new(self.clone(), v)).collect())
    }

    /// Runs `f` with mutable access to the graph data as an [`Emit`] (for ops' constructor
    /// functions and gradients).
    pub fn with_emit<R>(&self, f: impl FnOnce(&mut GraphData) -> R) -> R {
        f(&mut self.data.borrow_mut())
    }

    /// Read access to the graph data.
    pub fn data(&self) -> std::cell::Ref<'_, GraphData> {
        self.data.borrow()
    }

    /// A copy of the graph data (for compiling).
    pub fn snapshot(&self) -> GraphData {
        self.data.borrow().clone()
    }

    /// True when `a` and `b` are the same graph.
    pub fn same(&self, other: &Graph) -> bool {
        Rc::ptr_eq(&self.data, &other.data)
    }

    /// Sets the user-fixed nd-SBP of a node's output (when rebuilding a graph).
    fn fix_sbp(&self, value: Value, sbp: Option<NdSbp>) {
        self.data.borrow_mut().values[value.0 as usize].sbp = sbp;
    }

    fn own(&self, tensor: &Tensor) -> Result<Value> {
        if tensor.graph().same(self) {
            Ok(tensor.value())
        } else {
            Err(Error::Graph(format!("tensor %{} belongs to another graph", tensor.value().0)))
        }
    }
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let data = self.data.borrow();
        write!(f, "Graph({} values, {} nodes)", data.values.len(), data.nodes.len())
    }
}

/// Checks that `sbp` fits `placement` (one SBP per mesh axis) and `shape` (split axes exist).
fn check_sbp(name: &str, shape: &Shape, placement: &Placement, sbp: &NdSbp) -> Result<()> {
    let mesh_axes = placement.hierarchy().len();
    if sbp.len() != mesh_axes {
        return Err(Error::Graph(format!(
            "{name}: nd-SBP {sbp} has {} axes but placement {placement} has {mesh_axes}",
            sbp.len()
        )));
    }
    for s in sbp.axes() {
        if let Some(axis) = s.split_axis() {
            if axis >= shape.rank() {
                return Err(Error::Graph(format!(
                    "{name}: {sbp} splits axis {axis} but the shape {shape} has {} axes",
                    shape.rank()
                )));
            }
        }
    }
    Ok(())
}
