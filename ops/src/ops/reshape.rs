//! `reshape`: the same elements, in row-major order, under another shape.

use meshflow_placement::{Sbp, Signature};

use crate::{
    emit1, Context, Emit, Error, Op, OpRef, Result, Shape, Shard, Tensor, TensorMeta, Value,
};

/// Reshape to `shape` (the logical target; [`Op::localize`] gives the per-shard target).
///
/// Signatures, per device `d` (`y_d = reshape(x_d)` to the local target shape):
/// - `S(i) -> S(j)` when the axes before `i` in the input and before `j` in the output hold the
///   same number of elements, and axis `i` and axis `j` are the same axis (equal sizes: always
///   exact), or one is a leading factor of the other (`[.., H·D, ..] -> [.., H, D, ..]` splits
///   the heads, the reverse merges them). A leading factor is exact only when the devices of
///   the split divide it (whole heads per device): [`Op::localize`] checks that the region each
///   device holds is the same set of elements before and after, and refuses the signature
///   with [`Error::Signature`] naming the shapes and the regions otherwise;
/// - `B -> B`; `P -> P` (a reshape is linear).
#[derive(Clone, Debug)]
pub struct Reshape {
    /// The target shape.
    pub shape: Shape,
}

/// Applies [`Reshape`]; returns `x` itself when it already has `shape`.
pub fn reshape(e: &mut dyn Emit, x: Value, shape: &Shape) -> Result<Value> {
    emit_to_shape(e, x, shape, Reshape { shape: shape.clone() })
}

impl Op for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn is_view(&self) -> bool {
        true
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let same_count = |x: &Shape| x.numel() == self.shape.numel();
        infer_to_shape(self.name(), inputs, &self.shape, same_count, "element counts differ")
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        Ok(vec![x.reshaped(self.shape.clone())?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let Some(mut signatures) = linear_signatures(self, inputs) else { return Vec::new() };
        let pairs = split_pairs(inputs[0].shape.dims(), self.shape.dims());
        signatures.extend(
            pairs.into_iter().map(|(i, j)| Signature::new([Sbp::Split(i)], [Sbp::Split(j)])),
        );
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let shape = e.meta(inputs[0]).shape;
        Ok(vec![grads[0].map(|g| reshape(e, g, &shape)).transpose()?])
    }

    fn localize(
        &self,
        signature: &Signature,
        inputs: &[Shard],
        outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        if let ([input], [output]) = (inputs, outputs) {
            if runs(input) != runs(output) {
                return Err(Error::Signature {
                    op: self.name(),
                    inputs: signature.inputs.clone(),
                    outputs: signature.outputs.clone(),
                    reason: format!(
                        "the shard at {:?} of {:?} {} and the shard at {:?} of {:?} {} are not \
                         the same elements (the devices do not divide the split axis)",
                        input.offset,
                        input.local.shape.dims(),
                        input.logical,
                        output.offset,
                        output.local.shape.dims(),
                        output.logical,
                    ),
                });
            }
        }
        Ok(localize_to_shape(&self.shape, outputs, |shape| Reshape { shape }))
    }
}

/// The `(i, j)` such that `S(i)` of a tensor of dims `from` is `S(j)` of its reshape to `to`:
/// the axes before them hold as many elements, and the sizes are equal or one divides the other
/// (a leading factor). Axes of size 1 are never split.
fn split_pairs(from: &[usize], to: &[usize]) -> Vec<(usize, usize)> {
    let prefixes = |dims: &[usize]| -> Vec<usize> {
        dims.iter().scan(1, |product, &d| Some(std::mem::replace(product, *product * d))).collect()
    };
    let (before_from, before_to) = (prefixes(from), prefixes(to));
    let mut pairs = Vec::new();
    for (i, (&a, &outer)) in from.iter().zip(&before_from).enumerate() {
        let fits = |(j, (&b, &other)): (usize, (&usize, &usize))| {
            // Sizes 0 and 1 are never split (and a size 0 must not reach the remainders).
            let fits = other == outer && a > 1 && b > 1 && (a % b == 0 || b % a == 0);
            fits.then_some((i, j))
        };
        pairs.extend(to.iter().zip(&before_to).enumerate().filter_map(fits));
    }
    pairs
}

/// The elements a shard holds, in the row-major order of its logical tensor, as nested runs
/// `(size, offset, length)` from the outermost: neighbouring axes are merged where the inner one
/// is whole or the outer one holds a single index, so two shards of the same elements under
/// different shapes give the same runs.
fn runs(shard: &Shard) -> Vec<(usize, usize, usize)> {
    let (dims, lengths) = (shard.logical.dims(), shard.local.shape.dims());
    if lengths.contains(&0) {
        return Vec::new();
    }
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut inner: Option<(usize, usize, usize)> = None;
    for axis in (0..dims.len()).rev() {
        let (size, offset, length) = (dims[axis], shard.offset[axis], lengths[axis]);
        inner = Some(match inner {
            None => (size, offset, length),
            Some((s, o, l)) if (o == 0 && l == s) || length == 1 => {
                (size * s, offset * s + o, length * l)
            }
            Some(run) => {
                runs.push(run);
                (size, offset, length)
            }
        });
    }
    // A scalar holds its one element, like any shape of ones.
    runs.push(inner.unwrap_or((1, 0, 1)));
    runs.reverse();
    runs
}

// ---- shared with broadcast_to: ops whose attribute is the output shape ----

/// Emits `op` on `x`, or returns `x` itself when it already has `shape`.
pub(crate) fn emit_to_shape(
    e: &mut dyn Emit,
    x: Value,
    shape: &Shape,
    op: impl Op,
) -> Result<Value> {
    if &e.meta(x).shape == shape {
        return Ok(x);
    }
    emit1(e, op, &[x])
}

/// One input whose shape `fits` the target: the output meta is the target shape, same dtype.
pub(crate) fn infer_to_shape(
    op: &'static str,
    inputs: &[TensorMeta],
    target: &Shape,
    fits: impl Fn(&Shape) -> bool,
    reason: &str,
) -> Result<Vec<TensorMeta>> {
    let [x] = inputs else {
        return Err(Error::Arity { op, expected: 1, got: inputs.len() });
    };
    if !fits(&x.shape) {
        return Err(Error::shape(op, &[&x.shape, target], reason));
    }
    Ok(vec![TensorMeta::new(target.clone(), x.dtype)])
}

/// `B -> B` and `P -> P` (the op is linear); `None` for invalid metas.
pub(crate) fn linear_signatures(op: &dyn Op, inputs: &[TensorMeta]) -> Option<Vec<Signature>> {
    op.infer(inputs).ok()?;
    let partial = Signature::new([Sbp::PartialSum], [Sbp::PartialSum]);
    Some(vec![Signature::broadcast(1, 1), partial])
}

/// The per-shard op: the same op with the local output shape, or `None` when it is the global.
pub(crate) fn localize_to_shape<O: Op>(
    global: &Shape,
    outputs: &[Shard],
    with_shape: impl FnOnce(Shape) -> O,
) -> Option<OpRef> {
    let local = outputs[0].local.shape.clone();
    (&local != global).then(|| std::sync::Arc::new(with_shape(local)) as OpRef)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// The shard that device `index` of `parts` holds when `dims` is split on `axis`.
    fn shard(dims: &[usize], axis: usize, parts: usize, index: usize) -> Shard {
        let (start, len) = meshflow_placement::balanced_range(dims[axis], parts, index);
        let mut offset = vec![0; dims.len()];
        offset[axis] = start;
        let mut local = dims.to_vec();
        local[axis] = len;
        Shard { local: TensorMeta::new(local, DType::F32), logical: Shape::new(dims), offset }
    }

    fn split_heads(from: &[usize], to: &[usize], parts: usize) -> Vec<Result<Option<OpRef>>> {
        let op = Reshape { shape: Shape::new(to) };
        let signature = Signature::new([Sbp::Split(2)], [Sbp::Split(3)]);
        (0..parts)
            .map(|d| {
                op.localize(&signature, &[shard(from, 2, parts, d)], &[shard(to, 3, parts, d)])
            })
            .collect()
    }

    #[test]
    fn heads_split_when_the_devices_divide_them() {
        let signatures = Reshape { shape: Shape::new([2, 3, 1, 4, 5]) }
            .signatures(&[TensorMeta::new([2, 3, 20], DType::F32)]);
        let heads = Signature::new([Sbp::Split(2)], [Sbp::Split(3)]);
        assert!(signatures.contains(&heads), "{signatures:?}");
        let size_one = Signature::new([Sbp::Split(2)], [Sbp::Split(2)]);
        assert!(!signatures.contains(&size_one), "an axis of size 1 is never split");
        for local in split_heads(&[2, 3, 20], &[2, 3, 1, 4, 5], 2) {
            let local = local.expect("4 heads over 2 devices: whole heads each");
            let shape =
                local.and_then(|op| op.infer(&[TensorMeta::new([2, 3, 10], DType::F32)]).ok());
            assert_eq!(shape.map(|m| m[0].shape.dims().to_vec()), Some(vec![2, 3, 1, 2, 5]));
        }
    }

    #[test]
    fn empty_tensors_have_signatures_and_no_split_pairs_through_their_zero_axes() {
        // `[0, 8] -> [0, 2, 4]`: the empty batch has no pair (it panicked dividing by its 0).
        let signatures = Reshape { shape: Shape::new([0, 2, 4]) }
            .signatures(&[TensorMeta::new([0, 8], DType::F32)]);
        assert!(!signatures.is_empty());
        assert!(!signatures.contains(&Signature::new([Sbp::Split(0)], [Sbp::Split(0)])));
        assert_eq!(split_pairs(&[3, 0], &[0, 3]), Vec::new());
        assert!(split_pairs(&[0, 8], &[0, 2, 4]).iter().all(|&(i, j)| i > 0 && j > 0));
    }

    #[test]
    fn heads_that_the_devices_do_not_divide_are_refused() {
        let refused = split_heads(&[2, 3, 15], &[2, 3, 1, 3, 5], 2);
        let message = match &refused[0] {
            Err(error @ Error::Signature { op: "reshape", .. }) => error.to_string(),
            other => panic!("3 heads over 2 devices must be refused, got {other:?}"),
        };
        assert!(message.contains("[2, 3, 8]") && message.contains("[2, 3, 1, 2, 5]"), "{message}");
    }

    #[test]
    fn runs_of_the_same_elements_agree_across_shapes() {
        let first = Shard {
            local: TensorMeta::new([2, 3], DType::F32),
            logical: Shape::new([2, 6]),
            offset: vec![0, 3],
        };
        let second = Shard {
            local: TensorMeta::new([2, 1, 3], DType::F32),
            logical: Shape::new([2, 2, 3]),
            offset: vec![0, 1, 0],
        };
        assert_eq!(runs(&first), runs(&second));
        assert_eq!(runs(&first), [(2, 0, 2), (6, 3, 3)]);
        let whole = Shard { offset: vec![0, 0], ..shard(&[4, 6], 0, 1, 0) };
        assert_eq!(runs(&whole), [(24, 0, 24)]);
    }

    #[test]
    fn a_scalar_and_a_shape_of_ones_are_the_same_element() {
        let scalar = Shard {
            local: TensorMeta::new(Shape::new([0usize; 0]), DType::F32),
            logical: Shape::new([0usize; 0]),
            offset: vec![],
        };
        let ones = shard(&[1, 1], 0, 1, 0);
        assert_eq!(runs(&scalar), runs(&ones));
        // The broadcast scalar loss of a data-parallel program reshapes from [1, 1] to [].
        let op = Reshape { shape: Shape::new([0usize; 0]) };
        let broadcast = Signature::new([Sbp::Broadcast], [Sbp::Broadcast]);
        assert!(op.localize(&broadcast, &[ones], &[scalar]).is_ok());
    }
}
