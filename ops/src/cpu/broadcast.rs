//! Numpy broadcasting over contiguous tensors: a plan that collapses the output into rows of
//! its innermost (merged) axis, with per-operand strides that are 0 on broadcast axes.

use crate::cpu::{for_chunks, map2_slice, map_slice, FixLeft, FixRight, FloatElement, Map2};
use crate::{Context, Element, Result, Shape, Tensor};

/// How each operand is read while walking the output row by row.
#[derive(Clone, Debug)]
pub struct BroadcastPlan {
    /// Merged output dims, outermost first; the last is the row length.
    dims: Vec<usize>,
    /// Per operand, its stride (in elements) along each merged dim; 0 where it is broadcast.
    strides: Vec<Vec<usize>>,
}

impl BroadcastPlan {
    /// A plan reading each of `inputs` (each broadcastable to `out`, checked by the caller).
    pub fn new(inputs: &[&Shape], out: &Shape) -> Self {
        let rank = out.rank();
        let strides: Vec<Vec<usize>> = inputs
            .iter()
            .map(|shape| {
                let lead = rank - shape.rank();
                let own = shape.strides();
                (0..rank)
                    .map(|i| match i.checked_sub(lead) {
                        Some(j) if shape.dim(j) == out.dim(i) && out.dim(i) != 1 => own[j],
                        _ => 0,
                    })
                    .collect()
            })
            .collect();
        let mut plan = BroadcastPlan { dims: Vec::new(), strides: vec![Vec::new(); inputs.len()] };
        for i in 0..rank {
            plan.push_dim(out.dim(i), strides.iter().map(|s| s[i]).collect());
        }
        if plan.dims.is_empty() {
            // Every dim is 1: one row of one element (push_dim skips size-1 dims).
            plan.dims.push(1);
            plan.strides.iter_mut().for_each(|s| s.push(0));
        }
        plan
    }

    fn push_dim(&mut self, dim: usize, strides: Vec<usize>) {
        if dim == 1 {
            return;
        }
        if let Some(&last) = self.dims.last() {
            let mergeable =
                self.strides.iter().zip(&strides).all(|(s, &new)| s[s.len() - 1] == new * dim);
            if mergeable {
                let n = self.dims.len();
                self.dims[n - 1] = last * dim;
                for (s, new) in self.strides.iter_mut().zip(strides) {
                    s[n - 1] = new;
                }
                return;
            }
        }
        self.dims.push(dim);
        for (s, new) in self.strides.iter_mut().zip(strides) {
            s.push(new);
        }
    }

    /// Length of one row (the innermost merged dim).
    pub fn row_len(&self) -> usize {
        self.dims[self.dims.len() - 1]
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.dims[..self.dims.len() - 1].iter().product()
    }

    /// Stride of operand `input` along a row: 0 (broadcast) or 1.
    pub fn row_step(&self, input: usize) -> usize {
        let s = &self.strides[input];
        s[s.len() - 1]
    }

    /// Number of operands the plan reads.
    pub fn inputs(&self) -> usize {
        self.strides.len()
    }

    /// Runs `f(row, starts)` for every row of `out` (the output, `self.row_len()` elements a
    /// row), `starts[i]` being where operand `i`'s elements for that row begin; rows go in
    /// chunks over `ctx`'s threads ([`for_chunks`]).
    pub fn for_each_row<T: Send>(
        &self,
        ctx: &Context,
        out: &mut [T],
        f: impl Fn(&mut [T], &[usize]) + Sync + Send,
    ) {
        if out.is_empty() {
            return;
        }
        let (row, inputs) = (self.row_len(), self.inputs());
        let mut rows: Vec<&mut [T]> = out.chunks_mut(row).collect();
        for_chunks(ctx, &mut rows, row, |first, chunk| {
            let starts = self.row_starts(first, chunk.len());
            for (dst, start) in chunk.iter_mut().zip(starts.chunks_exact(inputs)) {
                f(dst, start);
            }
        });
    }

    /// Start offsets of each operand for rows `first..first + count`, flat: operand `i` of the
    /// `r`-th row is at `r * self.inputs() + i` (walk it with `chunks_exact(self.inputs())`).
    /// One buffer for all rows: a vector per row made a bias add over 1024 rows cost 1024
    /// allocations and frees (`_int_free` was 2% of a GPT training step).
    pub fn row_starts(&self, first: usize, count: usize) -> Vec<usize> {
        let outer = &self.dims[..self.dims.len() - 1];
        let mut coords = vec![0; outer.len()];
        let mut rest = first;
        for i in (0..outer.len()).rev() {
            coords[i] = rest % outer[i];
            rest /= outer[i];
        }
        let mut starts = Vec::with_capacity(count * self.inputs());
        for _ in 0..count {
            starts.extend(
                self.strides
                    .iter()
                    .map(|s| coords.iter().zip(s).map(|(c, st)| c * st).sum::<usize>()),
            );
            for i in (0..outer.len()).rev() {
                coords[i] += 1;
                if coords[i] < outer[i] {
                    break;
                }
                coords[i] = 0;
            }
        }
        starts
    }
}

/// `out = f(a, b)` with numpy broadcasting of `a` and `b` to `out_shape`, computed in `T::Acc`.
/// Same shapes and scalar operands run as flat maps; otherwise the output is walked row by row
/// (its innermost merged axis), each row a flat map over slices or with a fixed operand.
pub fn binary<T: FloatElement, F: Map2<T::Acc>>(
    ctx: &Context,
    a: &Tensor,
    b: &Tensor,
    out_shape: &Shape,
    f: &F,
) -> Result<Tensor> {
    if a.shape() == out_shape && b.shape() == out_shape {
        return crate::cpu::zip::<T, F>(ctx, a, b, f);
    }
    if b.numel() == 1 && a.shape() == out_shape {
        let right = b.as_slice::<T>()?[0].to_acc();
        return crate::cpu::unary::<T, _>(ctx, a, &FixRight(f, right));
    }
    if a.numel() == 1 && b.shape() == out_shape {
        let left = a.as_slice::<T>()?[0].to_acc();
        return crate::cpu::unary::<T, _>(ctx, b, &FixLeft(f, left));
    }
    let (xa, xb) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    let plan = BroadcastPlan::new(&[a.shape(), b.shape()], out_shape);
    let row = plan.row_len();
    let (step_a, step_b) = (plan.row_step(0), plan.row_step(1));
    let mut out = Tensor::for_overwrite(ctx, out_shape.clone(), T::DTYPE);
    if out.numel() == 0 {
        return Ok(out);
    }
    plan.for_each_row(ctx, out.as_mut_slice::<T>()?, |dst, start| {
        let (left, right) = (&xa[start[0]..], &xb[start[1]..]);
        match (step_a, step_b) {
            (0, 0) => dst.fill(T::from_acc(f.call::<false>(left[0].to_acc(), right[0].to_acc()))),
            (0, _) => map_slice(&FixLeft(f, left[0].to_acc()), &right[..row], dst),
            (_, 0) => map_slice(&FixRight(f, right[0].to_acc()), &left[..row], dst),
            _ => map2_slice(f, &left[..row], &right[..row], dst),
        }
    });
    Ok(out)
}

/// `x` broadcast to `out_shape` (any dtype), copied into a new tensor.
pub fn broadcast_copy<T: Element>(ctx: &Context, x: &Tensor, out_shape: &Shape) -> Result<Tensor> {
    let src = x.as_slice::<T>()?;
    let plan = BroadcastPlan::new(&[x.shape()], out_shape);
    let step = plan.row_step(0);
    let mut out = Tensor::for_overwrite(ctx, out_shape.clone(), x.dtype());
    plan.for_each_row(ctx, out.as_mut_slice::<T>()?, |dst, start| {
        let start = start[0];
        if step == 0 {
            dst.fill(src[start]);
        } else {
            dst.copy_from_slice(&src[start..start + dst.len()]);
        }
    });
    Ok(out)
}
