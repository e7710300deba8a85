//! `dropout`: y = x · keep / (1 − p), with `keep` drawn per element from a seeded counter-based
//! generator, so a sharded run equals the single-device run; with a step input, the mask changes
//! with the training step.

use meshflow_placement::{Sbp, Signature};

use crate::cpu::{for_chunks, FloatElement};
use crate::ops::unary::{elementwise_signatures, infer_float};
use crate::random::{hash, uniform_at};
use crate::{
    emit1, Context, DType, Emit, Error, Op, OpRef, Result, Shape, Shard, Tensor, TensorMeta, Value,
};

/// Zeroes each element with probability `p` and scales the rest by `1 / (1 − p)`.
///
/// Element `i` (its row-major index in the logical tensor) is kept when
/// `uniform_at(seed, i) ≥ p` ([`crate::random::uniform_at`]): the mask is a pure function of
/// `(seed, logical index)`. With a second input, a one-element step counter `s` (any float or
/// integer dtype), the seed is `hash(seed, s)` ([`crate::random::hash`]): the mask is a pure
/// function of `(seed, step, logical index)`, new at every step. On a shard, [`Op::localize`]
/// records the logical shape and the shard's offset so each device draws the numbers of its own
/// elements; localizing an op that already sits in a larger tensor (a micro-batch of the batch)
/// adds the offsets and keeps the larger logical shape, whichever was localized first. The same
/// shard given again (once per mesh axis) is applied once.
///
/// Signatures, per device `d` (the step, when given, is `B`): `S(i) -> S(i)`
/// (`y_d = dropout(x_d)` with the shard's indices), `B -> B`, and `P -> P` (the same mask on
/// every addend: `Σ_d m·x_d = m·x`).
#[derive(Clone, Debug)]
pub struct Dropout {
    /// Probability of zeroing an element, in `[0, 1]`.
    pub p: f64,
    /// The generator seed (a new one per step and per call site).
    pub seed: u64,
    /// The logical shape when this runs on a shard (`None`: the input is the whole tensor).
    pub logical: Option<Shape>,
    /// The shard's offset along each logical axis (empty: at the origin).
    pub offset: Vec<usize>,
    /// The last shard [`Op::localize`] applied (logical shape and offset), so the same shard
    /// given once per mesh axis is not added twice.
    pub applied: Option<(Shape, Vec<usize>)>,
}

impl Dropout {
    /// Dropout of probability `p` with `seed`, on whole tensors.
    pub fn new(p: f64, seed: u64) -> Self {
        Dropout { p, seed, logical: None, offset: Vec::new(), applied: None }
    }
}

/// Applies [`Dropout`] with a fixed mask.
pub fn dropout(e: &mut dyn Emit, x: Value, p: f64, seed: u64) -> Result<Value> {
    emit1(e, Dropout::new(p, seed), &[x])
}

/// Applies [`Dropout`] with a mask drawn for the step that the one-element `step` holds.
pub fn dropout_at_step(
    e: &mut dyn Emit,
    x: Value,
    step: Value,
    p: f64,
    seed: u64,
) -> Result<Value> {
    emit1(e, Dropout::new(p, seed), &[x, step])
}

impl Op for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        if !(0.0..=1.0).contains(&self.p) {
            return Err(Error::argument(self.name(), format!("p = {} is not in [0, 1]", self.p)));
        }
        let x = match inputs {
            [x, step] => {
                if step.shape.numel() != 1 || step.dtype == DType::Bool {
                    return Err(Error::shape(
                        self.name(),
                        &[&x.shape, &step.shape],
                        "the step input must be one number",
                    ));
                }
                infer_float(self.name(), std::slice::from_ref(x))?
            }
            _ => infer_float(self.name(), inputs)?,
        };
        // An empty shard (an axis smaller than its split) draws nothing, wherever it sits.
        if let Some(logical) = self.logical.as_ref().filter(|_| x.shape.numel() > 0) {
            let fits = logical.rank() == x.shape.rank()
                && self.offset.len() == logical.rank()
                && (0..logical.rank()).all(|k| self.offset[k] + x.shape.dim(k) <= logical.dim(k));
            if !fits {
                return Err(Error::shape(
                    self.name(),
                    &[&x.shape, logical],
                    "shard outside the logical shape",
                ));
            }
        }
        Ok(vec![x])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let seed = match inputs.get(1) {
            Some(step) => hash(self.seed, step.to_dtype(DType::F64)?.to_vec::<f64>()?[0] as u64),
            None => self.seed,
        };
        let out = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => {
            self.kernel::<T>(ctx, &inputs[0], seed)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let mut signatures = elementwise_signatures(&inputs[..1], true);
        signatures.retain(|s| s.inputs.len() == 1);
        debug_assert!(signatures.iter().any(|s| s.inputs[0] == Sbp::PartialSum));
        if inputs.len() == 2 {
            for signature in &mut signatures {
                signature.inputs.push(Sbp::Broadcast);
            }
        }
        signatures
    }

    /// `dx = dropout(g)` with the same mask (and step): dropout is linear in `x`; the step
    /// gets no gradient.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let dx = grads[0]
            .map(|g| {
                let mut args = vec![g];
                args.extend(inputs.get(1).copied());
                emit1(e, self.clone(), &args)
            })
            .transpose()?;
        Ok(if inputs.len() == 2 { vec![dx, None] } else { vec![dx] })
    }

    fn localize(
        &self,
        _signature: &Signature,
        inputs: &[Shard],
        _outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        let Some(shard) = inputs.first() else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: 0 });
        };
        let this = (shard.logical.clone(), shard.offset.clone());
        if self.applied.as_ref() == Some(&this) {
            return Ok(None);
        }
        let local = match (&self.logical, self.offset.len() == shard.offset.len()) {
            (Some(logical), true) => Dropout {
                logical: Some(if shard.logical.numel() > logical.numel() {
                    shard.logical.clone()
                } else {
                    logical.clone()
                }),
                offset: self.offset.iter().zip(&shard.offset).map(|(a, b)| a + b).collect(),
                applied: Some(this),
                ..self.clone()
            },
            _ => Dropout {
                logical: Some(shard.logical.clone()),
                offset: shard.offset.clone(),
                applied: Some(this),
                ..self.clone()
            },
        };
        Ok(Some(std::sync::Arc::new(local)))
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }

    fn is_stateful(&self) -> bool {
        true
    }
}

impl Dropout {
    fn kernel<T: FloatElement>(&self, ctx: &Context, x: &Tensor, seed: u64) -> Result<Tensor> {
        let mut out = Tensor::zeros(x.shape().clone(), x.dtype());
        if x.numel() == 0 {
            return Ok(out);
        }
        let src = x.as_slice::<T>()?;
        let dims = x.dims().to_vec();
        let logical = self.logical.clone().unwrap_or_else(|| x.shape().clone());
        let strides = logical.strides();
        let offset: Vec<usize> =
            if self.offset.is_empty() { vec![0; dims.len()] } else { self.offset.clone() };
        let row = dims.last().copied().unwrap_or(1);
        let outer = &dims[..dims.len().saturating_sub(1)];
        let p = self.p as f32;
        let scale = T::acc_from_f64(if self.p < 1.0 { 1.0 / (1.0 - self.p) } else { 0.0 });
        let mut rows: Vec<&mut [T]> = out.as_mut_slice::<T>()?.chunks_mut(row).collect();
        for_chunks(ctx, &mut rows, row, |first, chunk| {
            for (r, dst) in chunk.iter_mut().enumerate() {
                let (mut rest, mut base) = (first + r, offset.last().copied().unwrap_or(0));
                for k in (0..outer.len()).rev() {
                    base += (rest % outer[k] + offset[k]) * strides[k];
                    rest /= outer[k];
                }
                let src = &src[(first + r) * row..(first + r + 1) * row];
                for (j, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
                    let keep = uniform_at(seed, (base + j) as u64) >= p;
                    *d = if keep { T::from_acc(v.to_acc() * scale) } else { T::zero() };
                }
            }
        });
        Ok(out)
    }
}
