//! An eager tape: values are tensors held in memory, [`Emit::emit`] runs the op at once (infer,
//! then forward) and records the node, and [`Tape::gradients`] runs reverse-mode autodiff over the
//! record with [`crate::autodiff::gradients`], computing the gradient ops eagerly too.
//!
//! ```
//! use meshflow_ops::{eager::Tape, ops::mul::mul, Context, Tensor};
//!
//! let mut tape = Tape::new(Context::single_thread());
//! let x = tape.leaf(Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [3]).unwrap());
//! let y = mul(&mut tape, x, x).unwrap();
//! let ones = tape.leaf(Tensor::from_vec(vec![1.0f32; 3], [3]).unwrap());
//! let grads = tape.gradients(&[y], &[ones], &[x]).unwrap();
//! let dx = tape.tensor(grads[0].unwrap());
//! assert_eq!(dx.to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0]);
//! ```

use crate::autodiff::{gradients, Node};
use crate::{Context, Emit, Error, OpRef, Result, Tensor, TensorMeta, Value};

/// Tensors by [`Value`], and the ops applied to them in order.
#[derive(Debug, Default)]
pub struct Tape {
    ctx: Context,
    tensors: Vec<Tensor>,
    nodes: Vec<Node>,
}

impl Tape {
    /// An empty tape whose kernels run in `ctx`.
    pub fn new(ctx: Context) -> Self {
        Tape { ctx, tensors: Vec::new(), nodes: Vec::new() }
    }

    /// Adds a tensor that no op produced (an input, a parameter, a cotangent).
    pub fn leaf(&mut self, tensor: Tensor) -> Value {
        self.tensors.push(tensor);
        Value((self.tensors.len() - 1) as u32)
    }

    /// The tensor of a value; panics on a value that this tape did not hand out.
    pub fn tensor(&self, value: Value) -> &Tensor {
        &self.tensors[value.0 as usize]
    }

    /// The recorded ops, in the order they ran.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The execution context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Gradients of `Σ_k sum(outputs[k] · cotangents[k])` with respect to `wrt` (see
    /// [`crate::autodiff::gradients`]); the gradient ops run and are recorded on this tape.
    pub fn gradients(
        &mut self,
        outputs: &[Value],
        cotangents: &[Value],
        wrt: &[Value],
    ) -> Result<Vec<Option<Value>>> {
        let nodes = self.nodes.clone();
        gradients(self, &nodes, outputs, cotangents, wrt)
    }

    fn check(&self, value: Value) -> Result<&Tensor> {
        self.tensors.get(value.0 as usize).ok_or_else(|| {
            Error::argument("tape", format!("value {} is not on this tape", value.0))
        })
    }
}

impl Emit for Tape {
    fn meta(&self, value: Value) -> TensorMeta {
        self.tensor(value).meta().clone()
    }

    fn emit(&mut self, op: OpRef, inputs: &[Value]) -> Result<Vec<Value>> {
        let tensors: Vec<Tensor> =
            inputs.iter().map(|&v| self.check(v).cloned()).collect::<Result<_>>()?;
        let metas: Vec<TensorMeta> = tensors.iter().map(|t| t.meta().clone()).collect();
        let expected = op.infer(&metas)?;
        let results = op.forward(&self.ctx, &tensors)?;
        let produced: Vec<TensorMeta> = results.iter().map(|t| t.meta().clone()).collect();
        if produced != expected {
            return Err(Error::argument(
                op.name(),
                format!("forward produced {produced:?} but inference said {expected:?}"),
            ));
        }
        let outputs: Vec<Value> = results.into_iter().map(|t| self.leaf(t)).collect();
        self.nodes.push(Node { op, inputs: inputs.to_vec(), outputs: outputs.clone() });
        Ok(outputs)
    }
}
