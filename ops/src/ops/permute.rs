//! `permute`: the axes of a tensor reordered (and `transpose`, which swaps two of them).

use meshflow_placement::{Sbp, Signature};

use crate::{emit1, Context, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Output axis `k` is input axis `perm[k]`.
///
/// Signatures, per device `d`: `S(perm[k]) -> S(k)` for every `k` (`y_d = permute(x_d)`),
/// `B -> B`, and `P -> P` (a permutation is linear).
#[derive(Clone, Debug)]
pub struct Permute {
    /// The permutation.
    pub perm: Vec<usize>,
}

/// Applies [`Permute`].
pub fn permute(e: &mut dyn Emit, x: Value, perm: &[usize]) -> Result<Value> {
    emit1(e, Permute { perm: perm.to_vec() }, &[x])
}

/// Swaps axes `a` and `b` (negative counts from the end) with a [`Permute`].
pub fn transpose(e: &mut dyn Emit, x: Value, a: isize, b: isize) -> Result<Value> {
    let shape = e.meta(x).shape;
    let (a, b) = (shape.axis("transpose", a)?, shape.axis("transpose", b)?);
    let mut perm: Vec<usize> = (0..shape.rank()).collect();
    perm.swap(a, b);
    permute(e, x, &perm)
}

impl Permute {
    fn check(&self, shape: &Shape) -> Result<Shape> {
        let mut seen = vec![false; shape.rank()];
        let valid = self.perm.len() == shape.rank()
            && self.perm.iter().all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(Error::shape(
                "permute",
                &[shape],
                format!("{:?} is not a permutation of the axes", self.perm),
            ));
        }
        Ok(Shape::new(self.perm.iter().map(|&p| shape.dim(p)).collect::<Vec<_>>()))
    }

    fn inverse(&self) -> Vec<usize> {
        let mut inverse = vec![0; self.perm.len()];
        for (k, &p) in self.perm.iter().enumerate() {
            inverse[p] = k;
        }
        inverse
    }
}

impl Op for Permute {
    fn name(&self) -> &'static str {
        "permute"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        Ok(vec![TensorMeta::new(self.check(&x.shape)?, x.dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        self.check(x.shape())?;
        let out = crate::dispatch_any!(x.dtype(), T => {
            crate::cpu::layout::permute::<T>(ctx, x, &self.perm)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let mut signatures =
            vec![Signature::broadcast(1, 1), Signature::new([Sbp::PartialSum], [Sbp::PartialSum])];
        signatures.extend(
            self.perm
                .iter()
                .enumerate()
                .map(|(k, &p)| Signature::new([Sbp::Split(p)], [Sbp::Split(k)])),
        );
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        Ok(vec![grads[0].map(|g| permute(e, g, &self.inverse())).transpose()?])
    }
}
