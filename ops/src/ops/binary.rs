//! What the broadcasting binary ops (`add`, `sub`, `mul`, `div`) share: inference, the split
//! signatures that broadcasting allows, and the forward through [`crate::cpu::binary`].

use meshflow_placement::{Sbp, Signature};

use crate::{Error, Result, Shape, TensorMeta};

/// Output meta of a broadcasting binary op: both inputs of one float dtype, numpy broadcasting.
pub fn infer(op: &'static str, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
    let [a, b] = inputs else {
        return Err(Error::Arity { op, expected: 2, got: inputs.len() });
    };
    if a.dtype != b.dtype || !a.dtype.is_float() {
        return Err(Error::dtype(op, &[a.dtype, b.dtype], "needs two inputs of one float dtype"));
    }
    let shape = Shape::broadcast(op, &a.shape, &b.shape)?;
    Ok(vec![TensorMeta::new(shape, a.dtype)])
}

/// The SBP an input of shape `input` takes when the output (rank `rank`, dims `out`) is split
/// on axis `axis`: split on its own matching axis, or broadcast where it is broadcast.
fn split_of(input: &Shape, out: &Shape, axis: usize) -> Sbp {
    match (axis + input.rank()).checked_sub(out.rank()) {
        Some(j) if input.dim(j) == out.dim(axis) => Sbp::Split(j),
        _ => Sbp::Broadcast,
    }
}

/// `B, B -> B` and, for every output axis where at least one input is really split,
/// `S|B, S|B -> S(axis)`; `extra` adds the op's partial-sum signatures.
pub fn signatures(inputs: &[TensorMeta], extra: &[[Sbp; 3]]) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(2, 1)];
    let [a, b] = inputs else {
        return signatures;
    };
    let Ok(out) = Shape::broadcast("binary", &a.shape, &b.shape) else {
        return signatures;
    };
    for axis in 0..out.rank() {
        if out.dim(axis) == 1 {
            continue;
        }
        let (sa, sb) = (split_of(&a.shape, &out, axis), split_of(&b.shape, &out, axis));
        signatures.push(Signature::new([sa, sb], [Sbp::Split(axis)]));
    }
    signatures.extend(extra.iter().map(|[x, y, z]| Signature::new([*x, *y], [*z])));
    signatures
}

/// Runs a binary op's kernel `$f(x, y)` on the two inputs (a `Vec<Tensor>` the op owns) with
/// broadcasting, writing into an input of the output's shape that nothing else holds
/// ([`crate::cpu::binary_owned`]). `Op::forward` hands it clones (never written).
#[macro_export]
macro_rules! binary_forward {
    ($op:expr, $ctx:expr, $inputs:expr, |$x:ident, $y:ident| $f:expr) => {{
        let inputs: Vec<$crate::Tensor> = $inputs;
        let got = inputs.len();
        let Ok([a, b]) = <[$crate::Tensor; 2]>::try_from(inputs) else {
            return Err($crate::Error::Arity { op: $op, expected: 2, got });
        };
        let shape = $crate::Shape::broadcast($op, a.shape(), b.shape())?;
        if a.dtype() != b.dtype() {
            return Err($crate::Error::dtype($op, &[a.dtype(), b.dtype()], "dtypes differ"));
        }
        let out = $crate::dispatch_float!($op, a.dtype(), T => {
            type Acc = <T as $crate::cpu::FloatElement>::Acc;
            $crate::cpu::binary_owned::<T, _>($ctx, a, b, &shape, &|$x: Acc, $y: Acc| $f)
        })?;
        Ok(vec![out])
    }};
}
