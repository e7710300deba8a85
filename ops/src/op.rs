//! The op contract: every op is one type implementing [`Op`], in one file under `ops/src/ops/`.
//!
//! An op knows:
//! - its shape and dtype inference ([`Op::infer`]), with errors that name the op and the shapes;
//! - its 1-D SBP signatures ([`Op::signatures`]), with the per-device equation in its doc comment;
//! - how to run on tensors ([`Op::forward`]): the CPU kernel (and the CUDA launch when compiled);
//! - its gradient, expressed with other ops through an [`Emit`] ([`Op::backward`]), so the same
//!   code builds the backward of the logical graph and computes gradients eagerly in tests;
//! - what it becomes on one shard ([`Op::localize`]), for ops whose attributes hold global sizes
//!   or offsets (reshape targets, vocab-parallel embedding …).

use std::fmt;
use std::sync::Arc;

use meshflow_placement::{Placement, Signature};

use crate::{Context, Result, Tensor, TensorMeta};

/// A shared, immutable op.
pub type OpRef = Arc<dyn Op>;

/// One operation of the logical graph. (`Any` lets a device backend read an op's attributes:
/// see [`crate::cuda`].)
pub trait Op: std::any::Any + fmt::Debug + Send + Sync {
    /// Short name used in errors, reports and pictures, e.g. `matmul`.
    fn name(&self) -> &'static str;

    /// Output shapes and dtypes from input shapes and dtypes.
    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>>;

    /// Computes the outputs from concrete inputs on their device.
    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>>;

    /// [`Op::forward`] on inputs the caller gives up: an op may write an output into the
    /// storage of an input it holds the only reference to ([`Tensor::is_unique`]), updating it
    /// in place. The default borrows them.
    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.forward(ctx, &inputs)
    }

    /// The 1-D SBP signatures under which running the op on every shard is exact.
    /// The all-Broadcast signature is always among them.
    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature>;

    /// Gradients of the inputs (`None`: no gradient flows there) from the gradients of the
    /// outputs (`None`: that output does not reach the loss), built with other ops on `e`.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>>;

    /// [`Op::backward`] told which inputs need a gradient (`needed[i]`, one per input): an op
    /// whose gradients cost real work (a matrix product per operand) builds only those, and
    /// returns `None` for the others. The default builds them all.
    fn backward_needed(
        &self,
        e: &mut dyn Emit,
        (inputs, outputs): (&[Value], &[Value]),
        grads: &[Option<Value>],
        needed: &[bool],
    ) -> Result<Vec<Option<Value>>> {
        let _ = needed;
        self.backward(e, inputs, outputs, grads)
    }

    /// The op that runs on one shard under `signature`, when it differs from this one.
    /// `inputs` and `outputs` describe the shard; the default is the op itself (`None`).
    fn localize(
        &self,
        _signature: &Signature,
        _inputs: &[Shard],
        _outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        Ok(None)
    }

    /// Floating-point operations of one forward run on inputs of these shapes (cost model).
    fn flops(&self, _inputs: &[TensorMeta]) -> u64 {
        0
    }

    /// Of [`Op::flops`], those of matrix products: the work a GEMM unit (tensor cores, a CPU's
    /// blocked FMA kernels) does at its own roof, which the cost model prices at the matrix
    /// roof and the rest at the vector roof. The default, 0, is right for element-wise ops and
    /// reductions; a product is all matrix work, a fused attention mostly.
    fn matrix_flops(&self, _inputs: &[TensorMeta]) -> u64 {
        0
    }

    /// True when the output is a new view of the input's buffer (a reshape): running the op
    /// moves no bytes, and the cost model prices it at the per-kernel overhead alone.
    fn is_view(&self) -> bool {
        false
    }

    /// The placement the outputs live on when the op moves values between placements
    /// (`to_placement`); `None`, the default: on the inputs' (common) placement.
    fn output_placement(&self) -> Option<&Placement> {
        None
    }

    /// True when the outputs depend on something other than the inputs (a random generator),
    /// so the op must not be deduplicated or constant-folded.
    fn is_stateful(&self) -> bool {
        false
    }
}

/// One shard of a logical tensor on one device: its local meta, and where it sits in the logical
/// tensor (the logical shape and the offset of the shard along each axis).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Local shape and dtype.
    pub local: TensorMeta,
    /// The logical (global) shape.
    pub logical: crate::Shape,
    /// Offset of the shard along each logical axis (0 on axes that are not split).
    pub offset: Vec<usize>,
}

/// A value in whatever an [`Emit`] builds: a node output of a graph, or a tensor held eagerly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub u32);

/// Where gradients are built: the logical graph (autodiff) or an eager tape (tests).
pub trait Emit {
    /// The shape and dtype of a value.
    fn meta(&self, value: Value) -> TensorMeta;

    /// Applies `op` to `inputs` and returns its outputs.
    fn emit(&mut self, op: OpRef, inputs: &[Value]) -> Result<Vec<Value>>;
}

/// Applies a single-output op.
pub fn emit1(e: &mut dyn Emit, op: impl Op, inputs: &[Value]) -> Result<Value> {
    let outputs = e.emit(Arc::new(op), inputs)?;
    Ok(outputs[0])
}

/// Runs `op.infer` on the metas of `inputs`: the checks a forward makes before it reads data, so
/// that a forward called directly with bad inputs returns the same error as inference.
pub fn check_inputs(op: &dyn Op, inputs: &[Tensor]) -> Result<Vec<TensorMeta>> {
    let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
    op.infer(&metas)
}
