//! Reverse-mode autodiff on the logical graph: appends the backward nodes built by each op's
//! [`meshflow_ops::Op::backward`] (through `meshflow_ops::autodiff`), so gradients are ordinary
//! values of the same graph, placed and split like any other.

use meshflow_ops::autodiff::{gradients as walk, Node as WalkNode};
use meshflow_ops::Tensor as HostTensor;

use super::{Graph, Source, Tensor, ValueInfo};
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

    /// Appends the backward of `loss` (a scalar) and returns the gradient of each of `wrt`
    /// (`None` where `loss` does not depend on it).
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
        let nodes: Vec<WalkNode> = self
            .data()
            .nodes
            .iter()
            .map(|n| WalkNode {
                op: n.op.clone(),
                inputs: n.inputs.clone(),
                outputs: n.outputs.clone(),
            })
            .collect();
        let wrt_values = wrt.iter().map(|t| self.own(t)).collect::<Result<Vec<_>>>()?;
        let grads =
            self.with_emit(|e| walk(e, &nodes, &[loss.value()], &[seed.value()], &wrt_values))?;
        Ok(grads.into_iter().map(|g| g.map(|v| Tensor::new(self.clone(), v))).collect())
    }
}
