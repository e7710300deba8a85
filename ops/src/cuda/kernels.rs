//! [`CudaDevice::forward`]: the op's kernel family from [`table::kernel`], its attributes read
//! from the op itself ([`super::downcast`]), and the launch.

use std::sync::Arc;

use cudarc::driver::PushKernelArg;

use super::source::{contiguous_strides, AdamScalars, Layout, SgdScalars};
use super::spec::Spec;
use super::table::{self, Kernel};
use super::{downcast, CudaDevice};
use super::{launch, reduce};
use crate::ops::{
    adamw::AdamW, add::Add, add_scalar::AddScalar, bias_act::BiasAct, bias_act::BiasActGrad,
    concat::Concat, dropout::Dropout, fill::Fill, gelu::Gelu, layer_norm::LayerNorm,
    layer_norm::NormGrad, masked_fill::MaskedFill, max::Max, mean::Mean, mul_scalar::MulScalar,
    narrow::Narrow, narrow::Pad, permute::Permute, pow_scalar::PowScalar, rms_norm::RmsNorm,
    sgd::Sgd, skip_layer_norm::SkipLayerNorm, skip_layer_norm::SkipLayerNormGrad, split::Split,
    sum::Sum, unary::GradOf, unary::Unary,
};
use crate::{DType, Error, Op, Result, Storage, Tensor, TensorMeta};

/// Runs `op` on `inputs`, which must all live on `device`.
pub(super) fn forward(device: &CudaDevice, op: &dyn Op, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let outputs = crate::check_inputs(op, inputs)?;
    for input in inputs {
        if input.device() != device.device() {
            let reason = format!("{}: an input is on {}", op.name(), input.device());
            return Err(Error::Device { device: device.device().to_string(), reason });
        }
    }
    let name = op.name();
    let kernel = table::kernel(name)
        .ok_or_else(|| Error::argument(name, "no entry in the GPU kernel table (cuda::table)"))?;
    match kernel {
        Kernel::View => view(inputs, outputs),
        Kernel::Map => map(device, op, &inputs[0], &outputs[0]),
        Kernel::MapGrad => derivative(device, op, inputs, &outputs[0]),
        Kernel::BiasMap => bias_map(device, op, inputs, &outputs[0], None),
        Kernel::BiasMapGrad => bias_map_grad(device, op, inputs, &outputs),
        Kernel::Binary => binary(device, name, inputs, &outputs[0]),
        Kernel::Cast => cast(device, &inputs[0], &outputs[0]),
        Kernel::Fill => fill(device, &outputs[0], downcast::<Fill>(op).map_or(0.0, |f| f.value)),
        Kernel::Copy => copy_op(device, op, inputs, &outputs),
        Kernel::Reduce => reduce(device, op, &inputs[0], &outputs[0]),
        Kernel::Rows => rows(device, op, inputs, &outputs[0]),
        Kernel::Product => super::matmul::product(device, op, inputs, &outputs[0]),
        Kernel::Update => update(device, op, inputs, &outputs),
        Kernel::Select => select(device, op, inputs, &outputs[0]),
        Kernel::Route => route(device, inputs, &outputs[0]),
        Kernel::Dropout => dropout(device, op, inputs, &outputs[0]),
        Kernel::Embedding => super::nn::embedding(device, op, inputs, &outputs[0]),
        Kernel::CrossEntropy => super::nn::cross_entropy(device, op, inputs, &outputs[0]),
        Kernel::NormGrad => super::nn::norm_grad(device, op, inputs, &outputs),
        Kernel::Attention => super::attention::attention(device, op, inputs, &outputs),
        Kernel::Composite => composite(device, op, inputs),
    }
}

/// The first of the outputs of a part that `op` runs as (an `add`, a norm, a `sum`): an error
/// naming `op` when the part gave none.
pub(super) fn first_output(op: &'static str, outputs: Vec<Tensor>) -> Result<Tensor> {
    let missing = || Error::argument(op, "a part it runs as gave no output");
    outputs.into_iter().next().ok_or_else(missing)
}

/// A [`Kernel::Composite`] op as the ops it fuses, each through its own kernels.
fn composite(device: &CudaDevice, op: &dyn Op, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let first = |outputs| first_output(op.name(), outputs);
    if let Some(op) = downcast::<SkipLayerNorm>(op) {
        let [x, y, bias, weight, norm_bias] = inputs else {
            return Err(Error::Arity { op: op.name(), expected: 5, got: inputs.len() });
        };
        let branch = first(forward(device, &Add, &[y.clone(), bias.clone()])?)?;
        let sum = first(forward(device, &Add, &[x.clone(), branch])?)?;
        let norm = LayerNorm { eps: op.eps };
        let normed =
            first(forward(device, &norm, &[sum.clone(), weight.clone(), norm_bias.clone()])?)?;
        return Ok(vec![sum, normed]);
    }
    if let Some(op) = downcast::<SkipLayerNormGrad>(op) {
        let grad = NormGrad(LayerNorm { eps: op.eps });
        let [dx, dweight, dbias] = <[Tensor; 3]>::try_from(forward(device, &grad, &inputs[..3])?)
            .map_err(|_| {
            Error::argument(op.name(), "layer_norm_grad gave other than 3 outputs")
        })?;
        let dsum = match inputs.get(3) {
            Some(ds) => first(forward(device, &Add, &[dx, ds.clone()])?)?,
            None => dx,
        };
        // The bias gradient: the column sums over every axis but the last (a `[D]` sum is
        // its own column sums).
        let rank = dsum.shape().rank();
        let dsum_bias = if rank == 1 {
            dsum.clone()
        } else {
            let axes = (0..rank as isize - 1).collect();
            first(forward(device, &Sum { axes, keepdim: false }, std::slice::from_ref(&dsum))?)?
        };
        return Ok(vec![dsum, dweight, dbias, dsum_bias]);
    }
    Err(Error::argument(op.name(), "no composition for this op in cuda::kernels"))
}

/// A device buffer of `elements` values of `dtype` that a kernel overwrites before reading
/// (intermediate sums, statistics, scores); it returns to the caching allocator when dropped,
/// and stream order makes that safe while the kernels that use it are still queued.
pub(super) fn scratch(device: &CudaDevice, elements: usize, dtype: DType) -> Result<Tensor> {
    output(device, &TensorMeta::new([elements], dtype))
}

/// An uninitialised tensor of `meta` on `device`.
pub(super) fn output(device: &CudaDevice, meta: &TensorMeta) -> Result<Tensor> {
    let storage = device.storage(meta.bytes())?;
    Tensor::from_storage(meta.clone(), Arc::new(Storage::Cuda(storage)))
}

/// The device address of a GPU tensor's first element.
pub(super) fn pointer(tensor: &Tensor) -> Result<u64> {
    match &**tensor.storage() {
        Storage::Cuda(gpu) => Ok(gpu.pointer()),
        Storage::Cpu(_) => Err(Error::Device {
            device: "cpu".into(),
            reason: "a GPU kernel was given a host tensor".into(),
        }),
    }
}

fn view(inputs: &[Tensor], outputs: Vec<TensorMeta>) -> Result<Vec<Tensor>> {
    let meta = outputs.into_iter().next().expect("a view has one output");
    Ok(vec![Tensor::from_storage(meta, inputs[0].storage().clone())?])
}

/// The scalar attribute of an element-wise op (0 when it has none; for gelu, 1 = tanh form).
fn scalar(op: &dyn Op) -> f64 {
    if let Some(op) = downcast::<Unary<AddScalar>>(op) {
        op.0.value
    } else if let Some(op) = downcast::<Unary<MulScalar>>(op) {
        op.0.value
    } else if let Some(op) = downcast::<Unary<PowScalar>>(op) {
        op.0.exponent
    } else if let Some(op) = downcast::<Unary<Gelu>>(op) {
        f64::from(u8::from(op.0.tanh))
    } else if let Some(op) = downcast::<GradOf<Gelu>>(op) {
        f64::from(u8::from(op.0.tanh))
    } else if let Some(op) = downcast::<BiasAct<Gelu>>(op) {
        f64::from(u8::from(op.0.tanh))
    } else if let Some(op) = downcast::<BiasActGrad<Gelu>>(op) {
        f64::from(u8::from(op.0.tanh))
    } else {
        0.0
    }
}

fn map(device: &CudaDevice, op: &dyn Op, x: &Tensor, meta: &TensorMeta) -> Result<Vec<Tensor>> {
    let spec = Spec::Map(op.name(), meta.dtype);
    let y = output(device, meta)?;
    let (n, parameter) = (x.numel() as i64, scalar(op));
    let (xp, yp) = (pointer(x)?, pointer(&y)?);
    let shape = launch::elementwise(x.numel(), device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&yp).arg(&n).arg(&parameter);
    device.run(args, shape)?;
    Ok(vec![y])
}

fn derivative(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let spec = Spec::Derivative(op.name(), meta.dtype);
    let dx = output(device, meta)?;
    let (n, parameter) = (dx.numel() as i64, scalar(op));
    let (xp, gp, dp) = (pointer(&inputs[0])?, pointer(&inputs[1])?, pointer(&dx)?);
    let shape = launch::elementwise(dx.numel(), device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&gp).arg(&dp).arg(&n).arg(&parameter);
    device.run(args, shape)?;
    Ok(vec![dx])
}

/// `y = f(x + b)` from `[x, b]`, or with `g` (`[x, b, g]`) `dx = g · f'(x + b)`: one
/// element-wise launch, `b` indexed by the position along the last axis.
fn bias_map(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
    g: Option<&Tensor>,
) -> Result<Vec<Tensor>> {
    let inner = table::unbiased(op.name());
    let spec = match g {
        None => Spec::BiasMap(inner, meta.dtype),
        Some(_) => Spec::BiasDerivative(inner, meta.dtype),
    };
    let y = output(device, meta)?;
    let (n, width, parameter) = (y.numel() as i64, inputs[1].numel() as i64, scalar(op));
    let (xp, bp, yp) = (pointer(&inputs[0])?, pointer(&inputs[1])?, pointer(&y)?);
    let gp = g.map(pointer).transpose()?;
    let shape = launch::elementwise(y.numel(), device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&bp);
    if let Some(gp) = &gp {
        args.arg(gp);
    }
    args.arg(&yp).arg(&n).arg(&width).arg(&parameter);
    device.run(args, shape)?;
    Ok(vec![y])
}

/// `[dx, db]` from `[x, b, g]`: [`bias_map`]'s gradient launch, then `db` as the `sum` of `dx`
/// over every axis but the last.
fn bias_map_grad(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    outputs: &[TensorMeta],
) -> Result<Vec<Tensor>> {
    let dx = bias_map(device, op, inputs, &outputs[0], Some(&inputs[2]))?.remove(0);
    let leading: Vec<usize> = (0..dx.dims().len().saturating_sub(1)).collect();
    let db = reduce_axes(device, "sum", &dx, &leading, &outputs[1])?;
    Ok(vec![dx, db])
}

/// Strides of `input` read along the axes of `out` (numpy broadcasting: 0 where it repeats).
pub(super) fn broadcast_strides(input: &[usize], out: &[usize]) -> Vec<usize> {
    let strides = contiguous_strides(input);
    let offset = out.len() - input.len();
    (0..out.len())
        .map(|d| match d.checked_sub(offset) {
            Some(i) if input[i] == out[d] => strides[i],
            _ => 0,
        })
        .collect()
}

fn binary(
    device: &CudaDevice,
    name: &'static str,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let spec = Spec::Binary(name, meta.dtype);
    let out = meta.shape.dims();
    let (a, b) = (&inputs[0], &inputs[1]);
    let (sa, sb) = (broadcast_strides(a.dims(), out), broadcast_strides(b.dims(), out));
    let layout = Layout::new(name, out, &sa, &sb)?;
    let y = output(device, meta)?;
    let n = y.numel() as i64;
    let (ap, bp, yp) = (pointer(a)?, pointer(b)?, pointer(&y)?);
    let shape = launch::elementwise(y.numel(), device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&ap).arg(&bp).arg(&yp).arg(&n).arg(&layout);
    device.run(args, shape)?;
    Ok(vec![y])
}

pub(super) fn cast(device: &CudaDevice, x: &Tensor, meta: &TensorMeta) -> Result<Vec<Tensor>> {
    if x.dtype() == meta.dtype {
        return Ok(vec![x.clone()]);
    }
    let spec = Spec::Cast(x.dtype(), meta.dtype);
    let y = output(device, meta)?;
    let n = y.numel() as i64;
    let (xp, yp) = (pointer(x)?, pointer(&y)?);
    let shape = launch::elementwise(y.numel(), device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&yp).arg(&n);
    device.run(args, shape)?;
    Ok(vec![y])
}

fn fill(device: &CudaDevice, meta: &TensorMeta, value: f64) -> Result<Vec<Tensor>> {
    let y = output(device, meta)?;
    fill_tensor(device, &y, value)?;
    Ok(vec![y])
}

pub(super) fn fill_tensor(device: &CudaDevice, y: &Tensor, value: f64) -> Result<()> {
    let spec = Spec::Fill(y.dtype());
    let (yp, n) = (pointer(y)?, y.numel() as i64);
    let shape = launch::elementwise(y.numel(), device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&yp).arg(&n).arg(&value);
    device.run(args, shape)
}

/// Copies `layout.count()` elements from `x` to `y` (strides and bases in `layout`).
fn strided_copy(device: &CudaDevice, x: &Tensor, y: &Tensor, layout: Layout) -> Result<()> {
    let count = layout.count();
    if count == 0 {
        return Ok(());
    }
    let spec = Spec::Copy(x.dtype().size());
    let (xp, yp, n) = (pointer(x)?, pointer(y)?, count as i64);
    let shape = launch::elementwise(count, device.multiprocessors());
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&yp).arg(&n).arg(&layout);
    device.run(args, shape)
}

fn copy_op(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    outputs: &[TensorMeta],
) -> Result<Vec<Tensor>> {
    let name = op.name();
    let x = &inputs[0];
    let in_dims = x.dims();
    let in_strides = contiguous_strides(in_dims);
    if let Some(split) = downcast::<Split>(op) {
        let axis = x.shape().axis(name, split.axis)?;
        let mut start = 0;
        let mut results = Vec::with_capacity(outputs.len());
        for meta in outputs {
            let y = output(device, meta)?;
            let mut layout =
                Layout::new(name, y.dims(), &in_strides, &contiguous_strides(y.dims()))?;
            layout.first_base = (start * in_strides[axis]) as i64;
            strided_copy(device, x, &y, layout)?;
            start += y.dims()[axis];
            results.push(y);
        }
        return Ok(results);
    }
    let y = output(device, &outputs[0])?;
    let out_dims = y.dims().to_vec();
    let out_strides = contiguous_strides(&out_dims);
    if let Some(concat) = downcast::<Concat>(op) {
        let axis = y.shape().axis(name, concat.axis)?;
        let mut start = 0;
        for input in inputs {
            let strides = contiguous_strides(input.dims());
            let mut layout = Layout::new(name, input.dims(), &strides, &out_strides)?;
            layout.second_base = (start * out_strides[axis]) as i64;
            strided_copy(device, input, &y, layout)?;
            start += input.dims()[axis];
        }
    } else if let Some(narrow) = downcast::<Narrow>(op) {
        let axis = x.shape().axis(name, narrow.axis)?;
        let mut layout = Layout::new(name, &out_dims, &in_strides, &out_strides)?;
        layout.first_base = (narrow.start * in_strides[axis]) as i64;
        strided_copy(device, x, &y, layout)?;
    } else if let Some(pad) = downcast::<Pad>(op) {
        let axis = y.shape().axis(name, pad.axis)?;
        fill_tensor(device, &y, 0.0)?;
        let mut layout = Layout::new(name, in_dims, &in_strides, &out_strides)?;
        layout.second_base = (pad.start * out_strides[axis]) as i64;
        strided_copy(device, x, &y, layout)?;
    } else if let Some(permute) = downcast::<Permute>(op) {
        let first: Vec<usize> = permute.perm.iter().map(|&axis| in_strides[axis]).collect();
        strided_copy(device, x, &y, Layout::new(name, &out_dims, &first, &out_strides)?)?;
    } else {
        // broadcast_to: read the input with broadcasting strides.
        let first = broadcast_strides(in_dims, &out_dims);
        strided_copy(device, x, &y, Layout::new(name, &out_dims, &first, &out_strides)?)?;
    }
    Ok(vec![y])
}

/// `sum`, `mean` and `max` as block reductions ([`reduce::plan`]): one launch, or a partial
/// launch into a scratch buffer of the accumulation type and a launch that combines its chunks.
fn reduce(device: &CudaDevice, op: &dyn Op, x: &Tensor, meta: &TensorMeta) -> Result<Vec<Tensor>> {
    let name = op.name();
    let axes = if let Some(sum) = downcast::<Sum>(op) {
        &sum.axes
    } else if let Some(mean) = downcast::<Mean>(op) {
        &mean.axes
    } else if let Some(max) = downcast::<Max>(op) {
        &max.axes
    } else {
        return Err(Error::argument(name, "not a reduction the GPU backend knows"));
    };
    let reduced: Vec<usize> =
        if axes.is_empty() { (0..x.dims().len()).collect() } else { x.shape().axes(name, axes)? };
    Ok(vec![reduce_axes(device, name, x, &reduced, meta)?])
}

/// The reduction `name` (`sum`, `mean`, `max`) of `x` over the axes `reduced`, into a new tensor
/// of `meta`.
fn reduce_axes(
    device: &CudaDevice,
    name: &'static str,
    x: &Tensor,
    reduced: &[usize],
    meta: &TensorMeta,
) -> Result<Tensor> {
    let y = output(device, meta)?;
    if y.numel() == 0 {
        return Ok(y);
    }
    let launches = reduce::plan(name, x.dims(), reduced, device.multiprocessors())?;
    let partials = match launches.first() {
        Some(first) if launches.len() > 1 => {
            Some(scratch(device, first.partial_len(), super::nn::accumulation(meta.dtype))?)
        }
        _ => None,
    };
    let mut input = pointer(x)?;
    for run in &launches {
        let target = match (run.stage, &partials) {
            (reduce::Stage::Partial, Some(partials)) => pointer(partials)?,
            _ => pointer(&y)?,
        };
        let function = device.function(Spec::Reduce(name, meta.dtype, run.pass, run.stage))?;
        let [outputs, count, chunks, divisor] =
            [run.outputs, run.count, run.chunks, run.divisor].map(|n| n as i64);
        let mut args = device.stream().launch_builder(&function);
        args.arg(&input).arg(&target).arg(&outputs).arg(&run.kept).arg(&run.reduced);
        args.arg(&count).arg(&chunks).arg(&divisor);
        device.run(args, run.launch)?;
        input = target;
    }
    Ok(y)
}

fn rows(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let name = op.name();
    let spec = Spec::Rows(name, meta.dtype);
    let eps = downcast::<LayerNorm>(op)
        .map(|n| n.eps)
        .or_else(|| downcast::<RmsNorm>(op).map(|n| n.eps))
        .unwrap_or(0.0);
    let x = &inputs[0];
    let cols = x.dims().last().copied().unwrap_or(1);
    let row_count = x.numel().checked_div(cols).unwrap_or(0);
    let y = output(device, meta)?;
    if y.numel() == 0 {
        return Ok(vec![y]);
    }
    let xp = pointer(x)?;
    let up = inputs.get(1).map_or(Ok(xp), pointer)?;
    let wp = inputs.get(2).map_or(Ok(xp), pointer)?;
    let yp = pointer(&y)?;
    let (row_total, col_total) = (row_count as i64, cols as i64);
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&up).arg(&wp).arg(&yp).arg(&row_total).arg(&col_total).arg(&eps);
    device.run(args, launch::rows(row_count, cols))?;
    Ok(vec![y])
}

/// `masked_fill` (`x, mask` and the op's constant) and `where` (`cond, x, y`): a bool mask,
/// broadcast, picks the first value or the second ([`super::source::select_kernel`]).
fn select(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let out = meta.shape.dims();
    let constant = downcast::<MaskedFill>(op).map(|m| m.value);
    let (mask, then, other) = match constant {
        Some(_) => (&inputs[1], &inputs[0], &inputs[0]),
        None => (&inputs[0], &inputs[1], &inputs[2]),
    };
    let strides = |t: &Tensor| broadcast_strides(t.dims(), out);
    let layout = Layout::new(op.name(), out, &strides(mask), &strides(other))?;
    let zeros = vec![0; out.len()];
    let then_layout = Layout::new(op.name(), out, &strides(then), &zeros)?;
    let y = output(device, meta)?;
    if y.numel() == 0 {
        return Ok(vec![y]);
    }
    let (n, value) = (y.numel() as i64, constant.unwrap_or(0.0));
    let (mp, ap, bp, yp) = (pointer(mask)?, pointer(then)?, pointer(other)?, pointer(&y)?);
    let function = device.function(Spec::Select(meta.dtype, constant.is_some()))?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&mp).arg(&ap).arg(&bp).arg(&yp).arg(&n).arg(&layout).arg(&then_layout).arg(&value);
    device.run(args, launch::elementwise(y.numel(), device.multiprocessors()))?;
    Ok(vec![y])
}

/// `max_grad` (`x, y, g`): zeros, then `g` at each group's first maximum, one thread per group
/// (the reduced axes are those where `y` has size 1 and `x` does not).
fn route(device: &CudaDevice, inputs: &[Tensor], meta: &TensorMeta) -> Result<Vec<Tensor>> {
    let (x, y, g) = (&inputs[0], &inputs[1], &inputs[2]);
    let dx = output(device, meta)?;
    fill_tensor(device, &dx, 0.0)?;
    if dx.numel() == 0 {
        return Ok(vec![dx]);
    }
    let (dims, kept_dims) = (x.dims(), y.dims());
    let strides = contiguous_strides(dims);
    let (kept_axes, reduced_axes): (Vec<usize>, Vec<usize>) =
        (0..dims.len()).partition(|&axis| kept_dims[axis] == dims[axis]);
    let pick = |axes: &[usize], of: &[usize]| axes.iter().map(|&a| of[a]).collect::<Vec<_>>();
    let zeros = |count: usize| vec![0; count];
    let kept_sizes = pick(&kept_axes, dims);
    let kept =
        Layout::new("max_grad", &kept_sizes, &pick(&kept_axes, &strides), &zeros(kept_axes.len()))?;
    let reduced_sizes = pick(&reduced_axes, dims);
    let reduced_strides = pick(&reduced_axes, &strides);
    let over =
        Layout::new("max_grad", &reduced_sizes, &reduced_strides, &zeros(reduced_axes.len()))?;
    let (outputs, count) = (y.numel() as i64, over.count() as i64);
    let (xp, yp, gp, dp) = (pointer(x)?, pointer(y)?, pointer(g)?, pointer(&dx)?);
    let function = device.function(Spec::MaxGrad(meta.dtype))?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&yp).arg(&gp).arg(&dp).arg(&outputs).arg(&kept).arg(&over).arg(&count);
    device.run(args, launch::elementwise(y.numel(), device.multiprocessors()))?;
    Ok(vec![dx])
}

/// `dropout` (`x` and an optional step): the CPU's mask from the same counter-based hash, each
/// element's counter its index in the logical tensor (the shard's offset added).
fn dropout(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let Some(config) = downcast::<Dropout>(op) else {
        return Err(Error::argument(op.name(), "not a dropout the GPU backend knows"));
    };
    let x = &inputs[0];
    let dims = x.dims();
    let logical = config.logical.clone().unwrap_or_else(|| x.shape().clone());
    let strides = logical.strides();
    if strides.len() != dims.len()
        || (!config.offset.is_empty() && config.offset.len() != dims.len())
    {
        let reason = format!("the logical shape {logical} does not match the shard {dims:?}");
        return Err(Error::argument(op.name(), reason));
    }
    let mut layout = Layout::new(op.name(), dims, &strides, &vec![0; dims.len()])?;
    layout.first_base = config.offset.iter().zip(&strides).map(|(o, s)| (o * s) as i64).sum();
    let y = output(device, meta)?;
    if y.numel() == 0 {
        return Ok(vec![y]);
    }
    let step = inputs.get(1).unwrap_or(x);
    let spec = Spec::Dropout(meta.dtype, step.dtype());
    let (n, seed, has_step) = (y.numel() as i64, config.seed, i32::from(inputs.len() > 1));
    let (p, scale) = (config.p as f32, if config.p < 1.0 { 1.0 / (1.0 - config.p) } else { 0.0 });
    let (xp, yp, sp) = (pointer(x)?, pointer(&y)?, pointer(step)?);
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&yp).arg(&n).arg(&layout).arg(&seed).arg(&sp).arg(&has_step);
    args.arg(&p).arg(&scale);
    device.run(args, launch::elementwise(y.numel(), device.multiprocessors()))?;
    Ok(vec![y])
}

/// A fused optimizer update: AdamW or SGD (every input of one float dtype, as the ops check).
fn update(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    outputs: &[TensorMeta],
) -> Result<Vec<Tensor>> {
    let dtype = outputs[0].dtype;
    let results = outputs.iter().map(|meta| output(device, meta)).collect::<Result<Vec<_>>>()?;
    if results[0].numel() == 0 {
        return Ok(results);
    }
    let pointers = inputs.iter().chain(&results).map(pointer).collect::<Result<Vec<u64>>>()?;
    if let Some(config) = downcast::<AdamW>(op) {
        launch_update(
            device,
            Spec::AdamW(dtype),
            &pointers,
            results[0].numel(),
            AdamScalars::of(config),
        )?;
    } else if let Some(config) = downcast::<Sgd>(op) {
        launch_update(
            device,
            Spec::Sgd(dtype),
            &pointers,
            results[0].numel(),
            SgdScalars::of(config),
        )?;
    } else {
        return Err(Error::argument(op.name(), "not an update the GPU backend knows"));
    }
    Ok(results)
}

/// Launches an update kernel: the inputs' and outputs' addresses, the element count, the
/// scalars by value.
fn launch_update<S: cudarc::driver::DeviceRepr>(
    device: &CudaDevice,
    spec: Spec,
    pointers: &[u64],
    n: usize,
    scalars: S,
) -> Result<()> {
    let function = device.function(spec)?;
    let mut args = device.stream().launch_builder(&function);
    for address in pointers {
        args.arg(address);
    }
    let count = n as i64;
    args.arg(&count).arg(&scalars);
    device.run(args, launch::elementwise(n, device.multiprocessors()))
}
