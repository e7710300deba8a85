//! [`Tensor`]: the handle a training script holds on a value of a [`Graph`].

use std::fmt;

use meshflow_ops::{DType, Emit, Shape, TensorMeta, Value};
use meshflow_placement::{NdSbp, Placement};

use super::{Graph, GraphData};
use crate::Result;

/// A global (logical) tensor of a graph: its shape is the whole tensor's, whatever the mesh.
#[derive(Clone)]
pub struct Tensor {
    graph: Graph,
    value: Value,
}

impl Tensor {
    pub(super) fn new(graph: Graph, value: Value) -> Self {
        Tensor { graph, value }
    }

    /// The handle of `value` of `graph`.
    pub fn from_value(graph: &Graph, value: Value) -> Self {
        Tensor::new(graph.clone(), value)
    }

    /// The graph it belongs to.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Its value id in the graph.
    pub fn value(&self) -> Value {
        self.value
    }

    /// Logical shape and dtype.
    pub fn meta(&self) -> TensorMeta {
        self.graph.data().value(self.value).meta.clone()
    }

    /// Logical shape.
    pub fn shape(&self) -> Shape {
        self.meta().shape
    }

    /// Logical dimensions.
    pub fn dims(&self) -> Vec<usize> {
        self.meta().shape.0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.meta().dtype
    }

    /// The devices it lives on.
    pub fn placement(&self) -> Placement {
        self.graph.data().value(self.value).placement.clone()
    }

    /// The nd-SBP fixed by the user, if any.
    pub fn sbp(&self) -> Option<NdSbp> {
        self.graph.data().value(self.value).sbp.clone()
    }

    /// Applies an op constructor (`meshflow_ops::ops::…::name(e, values…)`) to values of this
    /// graph and wraps the result; the building block of every method below.
    pub fn emit_with(
        &self,
        f: impl FnOnce(&mut GraphData) -> meshflow_ops::Result<Value>,
    ) -> Result<Tensor> {
        let value = self.graph.with_emit(f)?;
        Ok(Tensor::new(self.graph.clone(), value))
    }

    /// Like [`Tensor::emit_with`] for ops with several outputs.
    pub fn emit_many(
        &self,
        f: impl FnOnce(&mut GraphData) -> meshflow_ops::Result<Vec<Value>>,
    ) -> Result<Vec<Tensor>> {
        let values = self.graph.with_emit(f)?;
        Ok(values.into_iter().map(|v| Tensor::new(self.graph.clone(), v)).collect())
    }

    /// This value on `placement` (another stage of a pipeline, or the same devices), with its
    /// nd-SBP there fixed when `sbp` is given, else chosen by the compiler.
    pub fn to_placement(&self, placement: &Placement, sbp: Option<NdSbp>) -> Result<Tensor> {
        self.graph.to_layout(self, placement, sbp)
    }

    /// This value with nd-SBP `sbp` on its placement (the compiler inserts the boxing).
    pub fn to_sbp(&self, sbp: NdSbp) -> Result<Tensor> {
        self.graph.to_layout(self, &self.placement(), Some(sbp))
    }

    /// The metadata of `value` in `e` (for constructors that need shapes).
    pub fn meta_in(e: &dyn Emit, value: Value) -> TensorMeta {
        e.meta(value)
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let data = self.graph.data();
        let info = data.value(self.value);
        write!(
            f,
            "Tensor({} {} {} on {}",
            data.label(self.value),
            info.meta.shape,
            info.meta.dtype,
            info.placement
        )?;
        if let Some(sbp) = &info.sbp {
            write!(f, " {sbp}")?;
        }
        f.write_str(")")
    }
}
