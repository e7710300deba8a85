//! The distribution conformance suite: every op, under every signature it declares, on meshes
//! `[1]`, `[2]`, `[3]`, `[4]` and `[2, 2]` (nd signatures are the products over mesh axes),
//! equals the single-device result.
//!
//! For each case (an op and random input shapes, uneven splits included) and each nd
//! signature: inputs are split per their nd-SBP (partial sums as random addends that sum to the
//! value), the op is localized for each device with that device's `Shard` metas (once per mesh
//! axis, see [`localize`]) and run on its shards, and the outputs, read per the output nd-SBP (partial sums added up, every broadcast
//! copy checked), are compared with the op run on the whole tensors. A signature that the op
//! refuses for a device's shard when it is localized ([`meshflow_ops::Error::Signature`]: a
//! reshape whose split the devices do not divide into whole heads) is skipped on that mesh,
//! as the compiler refuses it there with the same error; everywhere else it must be exact.
//!
//! Adding an op is one line in the `conformance!` block at the end: a test name and a function
//! from random dims to a [`Case`].

use std::sync::Arc;

use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::add_scalar::AddScalar;
use meshflow_ops::ops::bias_act::{BiasAct, BiasActGrad};
use meshflow_ops::ops::concat::Concat;
use meshflow_ops::ops::cross_entropy::{CrossEntropy, CrossEntropyGrad};
use meshflow_ops::ops::dropout::Dropout;
use meshflow_ops::ops::embedding::{Embedding, EmbeddingGrad};
use meshflow_ops::ops::exp::Exp;
use meshflow_ops::ops::fill::Fill as FillOp;
use meshflow_ops::ops::gelu::Gelu;
use meshflow_ops::ops::layer_norm::{LayerNorm, NormGrad};
use meshflow_ops::ops::log::Log;
use meshflow_ops::ops::log_softmax::LogSoftmax;
use meshflow_ops::ops::masked_fill::MaskedFill;
use meshflow_ops::ops::matmul::{MatMul, MatMulSumBatch};
use meshflow_ops::ops::max::{Max, MaxGrad};
use meshflow_ops::ops::mean::Mean;
use meshflow_ops::ops::mul_scalar::MulScalar;
use meshflow_ops::ops::narrow::{Narrow, Pad};
use meshflow_ops::ops::permute::Permute;
use meshflow_ops::ops::pow::Pow;
use meshflow_ops::ops::pow_scalar::PowScalar;
use meshflow_ops::ops::relu::Relu;
use meshflow_ops::ops::rms_norm::RmsNorm;
use meshflow_ops::ops::rsqrt::Rsqrt;
use meshflow_ops::ops::sgd::Sgd;
use meshflow_ops::ops::sigmoid::Sigmoid;
use meshflow_ops::ops::silu::Silu;
use meshflow_ops::ops::skip_layer_norm::{SkipLayerNorm, SkipLayerNormGrad};
use meshflow_ops::ops::softmax::{RowGrad, Softmax};
use meshflow_ops::ops::split::Split;
use meshflow_ops::ops::sqrt::Sqrt;
use meshflow_ops::ops::tanh::Tanh;
use meshflow_ops::ops::unary::{GradOf, Unary};
use meshflow_ops::ops::where_select::Where;
use meshflow_ops::ops::{
    add::Add, broadcast_to::BroadcastTo, cast::Cast, div::Div, mul::Mul, neg::Neg,
    reshape::Reshape, sub::Sub, sum::Sum,
};
use meshflow_ops::{Context, DType, Op, OpRef, Shape, Shard, Tensor, TensorMeta};
use meshflow_placement::reference::{DenseTensor, Sharded};
use meshflow_placement::{
    local_region, nd_signatures, DeviceType, Layout, NdSbp, NdSignature, Placement, Signature,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The start of the problem text of a signature that an op refuses on a mesh (skipped).
const REFUSED: &str = "refused on this mesh: ";

/// The meshes every op runs on.
const MESHES: [&[usize]; 5] = [&[1], &[2], &[3], &[4], &[2, 2]];

/// How an input's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Uniform in `[-2, 2)`.
    Signed,
    /// Uniform in `[0.5, 2)` (denominators, logarithms).
    Positive,
    /// Integers in `0..n` (token ids, class targets).
    Ids(usize),
}

/// One input of a case.
#[derive(Clone, Debug)]
struct Input {
    shape: Vec<usize>,
    dtype: DType,
    fill: Fill,
}

/// An op and the inputs it runs on.
#[derive(Clone, Debug)]
struct Case {
    op: OpRef,
    inputs: Vec<Input>,
}

impl Case {
    fn new(op: impl Op) -> Self {
        Case { op: Arc::new(op), inputs: Vec::new() }
    }

    /// Adds an f64 input with values in `[-2, 2)`.
    fn float(self, shape: impl Into<Vec<usize>>) -> Self {
        self.input(shape, DType::F64, Fill::Signed)
    }

    /// Adds an i64 input of integers in `0..n`.
    fn ids(self, shape: impl Into<Vec<usize>>, n: usize) -> Self {
        self.input(shape, DType::I64, Fill::Ids(n))
    }

    /// Adds an f32 input with values in `[-2, 2)`.
    fn float32(self, shape: impl Into<Vec<usize>>) -> Self {
        self.input(shape, DType::F32, Fill::Signed)
    }

    /// Adds an input of any dtype and fill.
    fn input(mut self, shape: impl Into<Vec<usize>>, dtype: DType, fill: Fill) -> Self {
        self.inputs.push(Input { shape: shape.into(), dtype, fill });
        self
    }
}

/// Random sizes a case draws its shapes from (1 to 6: splits over 2, 3 and 4 devices are often
/// uneven, and sometimes leave a device with nothing).
struct Dims(Vec<usize>);

impl std::ops::Index<usize> for Dims {
    type Output = usize;
    fn index(&self, index: usize) -> &usize {
        &self.0[index]
    }
}

impl Dims {
    /// The first `rank` sizes as a shape.
    fn shape(&self, rank: usize) -> Vec<usize> {
        self.0[..rank].to_vec()
    }
}

/// Runs `case` on every mesh and signature; the error lists every failing signature.
fn check(case: &Case, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let metas: Vec<TensorMeta> =
        case.inputs.iter().map(|i| TensorMeta::new(i.shape.clone(), i.dtype)).collect();
    let name = case.op.name();
    // Drawn in f64, then made exactly representable in each input's dtype.
    let logical = case.inputs.iter().map(|input| {
        let drawn = random_input(input, &mut rng);
        to_dense(&to_tensor(&drawn, input.dtype)?)
    });
    let logical = logical.collect::<Result<Vec<_>, String>>()?;
    let tensors =
        logical.iter().zip(&case.inputs).map(|(dense, input)| to_tensor(dense, input.dtype));
    let tensors = tensors.collect::<Result<Vec<_>, _>>()?;
    let context = Context::single_thread();
    let expected = case.op.forward(&context, &tensors).map_err(|e| format!("{name}: {e}"))?;
    let output_metas: Vec<TensorMeta> = expected.iter().map(|t| t.meta().clone()).collect();
    let expected = expected.iter().map(to_dense).collect::<Result<Vec<_>, _>>()?;
    let signatures = case.op.signatures(&metas);
    check_declared(name, &signatures, &metas, &output_metas)?;
    let run = Run { case, logical: &logical, expected: &expected, output_metas: &output_metas };
    let mut failures = Vec::new();
    for hierarchy in MESHES {
        let placement = Placement::grid(DeviceType::Cpu, hierarchy).map_err(|e| e.to_string())?;
        for signature in nd_signatures(&signatures, hierarchy.len()) {
            if let Err(problem) = run.signature(&placement, &signature, &mut rng) {
                if problem.starts_with(REFUSED) {
                    continue;
                }
                failures.push(format!("{name} [{signature}] on {placement}: {problem}"));
            }
        }
    }
    match failures.is_empty() {
        true => Ok(()),
        false => Err(failures.join("\n")),
    }
}

/// Every declared signature has the op's arity and in-range split axes; all-broadcast is there.
fn check_declared(
    name: &str,
    signatures: &[Signature],
    inputs: &[TensorMeta],
    outputs: &[TensorMeta],
) -> Result<(), String> {
    let input_ranks: Vec<usize> = inputs.iter().map(|m| m.shape.rank()).collect();
    let output_ranks: Vec<usize> = outputs.iter().map(|m| m.shape.rank()).collect();
    for signature in signatures {
        signature
            .check(name, &input_ranks, &output_ranks, signatures)
            .map_err(|e| e.to_string())?;
    }
    let broadcast = Signature::broadcast(inputs.len(), outputs.len());
    match signatures.contains(&broadcast) {
        true => Ok(()),
        false => Err(format!("{name}: no all-broadcast signature")),
    }
}

/// One case's data, shared by the signatures it runs under.
struct Run<'a> {
    case: &'a Case,
    logical: &'a [DenseTensor],
    expected: &'a [DenseTensor],
    output_metas: &'a [TensorMeta],
}

impl Run<'_> {
    /// Shards the inputs, runs every device, and compares the assembled outputs.
    fn signature(
        &self,
        placement: &Placement,
        signature: &NdSignature,
        rng: &mut StdRng,
    ) -> Result<(), String> {
        let mut inputs = Vec::new();
        for ((dense, nd), input) in
            self.logical.iter().zip(&signature.inputs).zip(&self.case.inputs)
        {
            let layout = Layout::new(placement.clone(), nd.clone());
            let integer = !input.dtype.is_float();
            let mut addend = || random_addend(rng, integer);
            inputs.push(Sharded::shard(dense, &layout, &mut addend).map_err(|e| e.to_string())?);
        }
        let mut outputs: Vec<Vec<DenseTensor>> = vec![Vec::new(); self.expected.len()];
        for index in 0..placement.size() {
            let locals = self.device(placement, signature, &inputs, index)?;
            for (output, local) in outputs.iter_mut().zip(locals) {
                output.push(local);
            }
        }
        for ((locals, nd), expected) in
            outputs.into_iter().zip(&signature.outputs).zip(self.expected)
        {
            let layout = Layout::new(placement.clone(), nd.clone());
            let sharded = Sharded { layout, logical: expected.shape.clone(), locals };
            let scale = expected.data.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            if let Some(problem) = sharded.mismatch(expected, self.tolerance() * scale) {
                return Err(problem);
            }
        }
        Ok(())
    }

    /// Runs the localized op on device `index` and returns its outputs as dense tensors.
    fn device(
        &self,
        placement: &Placement,
        signature: &NdSignature,
        inputs: &[Sharded],
        index: usize,
    ) -> Result<Vec<DenseTensor>, String> {
        let coordinates = placement.coordinates_of_index(index);
        let hierarchy = placement.hierarchy();
        let mut shards = Vec::new();
        let mut tensors = Vec::new();
        for ((sharded, nd), input) in inputs.iter().zip(&signature.inputs).zip(&self.case.inputs) {
            let local = &sharded.locals[index];
            shards.push(shard(&input.shape, input.dtype, nd, hierarchy, &coordinates)?);
            tensors.push(to_tensor(local, input.dtype)?);
        }
        let output_shards =
            self.output_metas.iter().zip(&signature.outputs).map(|(meta, nd)| {
                shard(meta.shape.dims(), meta.dtype, nd, hierarchy, &coordinates)
            });
        let output_shards = output_shards.collect::<Result<Vec<_>, _>>()?;
        let local_op = localize(&self.case.op, signature, &shards, &output_shards)?;
        let context = Context::single_thread();
        let outputs =
            local_op.forward(&context, &tensors).map_err(|e| format!("device {index}: {e}"))?;
        outputs.iter().map(to_dense).collect()
    }

    /// Absolute tolerance per unit of the largest expected magnitude.
    fn tolerance(&self) -> f64 {
        let dtypes = self
            .case
            .inputs
            .iter()
            .map(|i| i.dtype)
            .chain(self.output_metas.iter().map(|m| m.dtype));
        match dtypes.into_iter().any(|d| d != DType::F64 && d.is_float()) {
            true => 1e-3,
            false => 1e-9,
        }
    }
}

/// The op that runs on one device: `localize` is applied once per mesh axis, with that axis's
/// 1-D signature, to the op the previous axis returned; the `Shard` metas are always the exact
/// nd-local ones (so a vocab split on either mesh axis of `(S(1), S(0))` is seen).
fn localize(
    op: &OpRef,
    signature: &NdSignature,
    inputs: &[Shard],
    outputs: &[Shard],
) -> Result<OpRef, String> {
    let mut local = op.clone();
    for axis in 0..signature.inputs.first().or(signature.outputs.first()).map_or(0, NdSbp::len) {
        let one = signature.axis(axis);
        let refused = |e: meshflow_ops::Error| match e {
            meshflow_ops::Error::Signature { .. } => format!("{REFUSED}{e}"),
            other => other.to_string(),
        };
        if let Some(next) = local.localize(&one, inputs, outputs).map_err(refused)? {
            local = next;
        }
    }
    Ok(local)
}

/// The `Shard` meta of a tensor on the device at `coordinates`.
fn shard(
    logical: &[usize],
    dtype: DType,
    nd: &NdSbp,
    hierarchy: &[usize],
    coordinates: &[usize],
) -> Result<Shard, String> {
    let region = local_region(logical, nd, hierarchy, coordinates).map_err(|e| e.to_string())?;
    Ok(Shard {
        local: TensorMeta::new(region.shape, dtype),
        logical: Shape::new(logical.to_vec()),
        offset: region.offsets,
    })
}

fn random_input(input: &Input, rng: &mut StdRng) -> DenseTensor {
    let numel = input.shape.iter().product::<usize>();
    let draw = |rng: &mut StdRng| match input.fill {
        Fill::Signed => rng.random_range(-2.0..2.0),
        Fill::Positive => rng.random_range(0.5..2.0),
        Fill::Ids(n) => rng.random_range(0..n) as f64,
    };
    let data: Vec<f64> = (0..numel).map(|_| draw(rng)).collect();
    DenseTensor::new(input.shape.clone(), data)
}

fn random_addend(rng: &mut StdRng, integer: bool) -> f64 {
    match integer {
        true => rng.random_range(-3i32..4) as f64,
        false => rng.random_range(-1.0..1.0),
    }
}

fn to_tensor(dense: &DenseTensor, dtype: DType) -> Result<Tensor, String> {
    let tensor = Tensor::from_slice(&dense.data, dense.shape.clone()).map_err(|e| e.to_string())?;
    tensor.to_dtype(dtype).map_err(|e| e.to_string())
}

fn to_dense(tensor: &Tensor) -> Result<DenseTensor, String> {
    let data =
        tensor.to_dtype(DType::F64).and_then(|t| t.to_vec::<f64>()).map_err(|e| e.to_string())?;
    Ok(DenseTensor::new(tensor.dims().to_vec(), data))
}

/// One proptest per op: `name => |dims: &Dims| -> Case`.
macro_rules! conformance {
    ($($name:ident => $case:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(16))]
            $(
                #[test]
                fn $name(dims in prop::collection::vec(1usize..7, 6), seed in any::<u64>()) {
                    let build: fn(&Dims) -> Case = $case;
                    let case = build(&Dims(dims));
                    prop_assert_eq!(check(&case, seed), Ok(()));
                }
            )*
        }
    };
}

conformance! {
    neg => |d| Case::new(Neg).float(d.shape(3));
    add => |d| Case::new(Add).float(d.shape(3)).float([d[1], d[2]]);
    add_broadcast_row => |d| Case::new(Add).float([d[0], 1]).float([d[0], d[1]]);
    sub => |d| Case::new(Sub).float([d[0], d[1]]).float([d[0], d[1]]);
    mul => |d| Case::new(Mul).float(d.shape(3)).float([d[2]]);
    div => |d| Case::new(Div).float([d[0], d[1]]).input([d[1]], DType::F64, Fill::Positive);
    sum_inner => |d| Case::new(Sum { axes: vec![-1], keepdim: false }).float(d.shape(3));
    sum_keepdim => |d| Case::new(Sum { axes: vec![0, 2], keepdim: true }).float(d.shape(3));
    reshape_merge_tail => |d| Case::new(Reshape { shape: Shape::new([d[0], d[1] * d[2]]) }).float(d.shape(3));
    reshape_merge_head => |d| Case::new(Reshape { shape: Shape::new([d[0] * d[1], d[2]]) }).float(d.shape(3));
    reshape_split_heads => |d| Case::new(Reshape { shape: Shape::new([d[0], 1, 12, d[1]]) }).float([d[0], 12 * d[1]]);
    reshape_merge_heads => |d| Case::new(Reshape { shape: Shape::new([d[0], 12 * d[1]]) }).float([d[0], 12, d[1]]);
    reshape_uneven_heads => |d| Case::new(Reshape { shape: Shape::new([d[0], d[1], d[2]]) }).float([d[0], d[1] * d[2]]);
    broadcast_to => |d| Case::new(BroadcastTo { shape: Shape::new(d.shape(3)) }).float([1, d[2]]);
    broadcast_to_rank => |d| Case::new(BroadcastTo { shape: Shape::new(d.shape(3)) }).float([d[1], d[2]]);
    cast_to_f32 => |d| Case::new(Cast { dtype: DType::F32 }).float(d.shape(2));
    cast_to_i64 => |d| Case::new(Cast { dtype: DType::I64 }).float(d.shape(2));
    matmul => |d| Case::new(product(false, false)).float([d[0], d[1]]).float([d[1], d[2]]);
    matmul_transposed_a => |d| Case::new(product(true, false)).float([d[1], d[0]]).float([d[1], d[2]]);
    matmul_transposed_b => |d| Case::new(product(false, true)).float([d[0], d[1]]).float([d[2], d[1]]);
    matmul_batched => |d| Case::new(product(false, false)).float([d[3], d[0], d[1]]).float([d[3], d[1], d[2]]);
    matmul_batched_by_matrix => |d| Case::new(product(false, true)).float([d[3], d[0], d[1]]).float([d[2], d[1]]);
    matmul_sum_batch => |d| Case::new(MatMulSumBatch { transpose_a: true, transpose_b: false })
        .float([d[3], d[0], d[1]]).float([d[3], d[0], d[2]]);
    softmax => |d| Case::new(Softmax).float(d.shape(3));
    softmax_grad => |d| Case::new(RowGrad(Softmax)).float(d.shape(3)).float(d.shape(3));
    log_softmax => |d| Case::new(LogSoftmax).float(d.shape(2));
    log_softmax_grad => |d| Case::new(RowGrad(LogSoftmax)).float(d.shape(2)).float(d.shape(2));
    layer_norm => |d| Case::new(LayerNorm { eps: 1e-5 }).float(d.shape(3)).float([d[2]]).float([d[2]]);
    layer_norm_grad => |d| Case::new(NormGrad(LayerNorm { eps: 1e-5 })).float(d.shape(3)).float([d[2]]).float(d.shape(3));
    skip_layer_norm => |d| Case::new(SkipLayerNorm { eps: 1e-5 }).float(d.shape(3)).float(d.shape(3))
        .float([d[2]]).float([d[2]]).float([d[2]]);
    skip_layer_norm_grad => |d| Case::new(SkipLayerNormGrad { eps: 1e-5 }).float(d.shape(3)).float([d[2]])
        .float(d.shape(3)).float(d.shape(3));
    skip_layer_norm_grad_without_ds => |d| Case::new(SkipLayerNormGrad { eps: 1e-5 }).float(d.shape(2))
        .float([d[1]]).float(d.shape(2));
    rms_norm => |d| Case::new(RmsNorm { eps: 1e-5 }).float(d.shape(2)).float([d[1]]);
    rms_norm_grad => |d| Case::new(NormGrad(RmsNorm { eps: 1e-5 })).float(d.shape(3)).float([d[2]]).float(d.shape(3));
    embedding => |d| Case::new(Embedding { shard: None }).float([d[0] + 1, d[1]]).ids([d[2], d[3]], d[0] + 1);
    embedding_grad => |d| Case::new(EmbeddingGrad { rows: d[0] + 1, shard: None })
        .ids([d[2], d[3]], d[0] + 1).float([d[2], d[3], d[1]]);
    cross_entropy => |d| Case::new(CrossEntropy { positions: None }).float(d.shape(3)).ids([d[0], d[1]], d[2]);
    cross_entropy_grad => |d| Case::new(CrossEntropyGrad { positions: None })
        .float([d[0], d[1]]).ids([d[0]], d[1]).float([]);
    sgd => |d| Case::new(Sgd { momentum: 0.9, weight_decay: 0.1, ..Sgd::new(0.1) })
        .float(d.shape(2)).float(d.shape(2)).float(d.shape(2));
    adamw => |d| Case::new(AdamW { step: 3, ..AdamW::new(0.01) })
        .float(d.shape(2)).float(d.shape(2)).float(d.shape(2)).input(d.shape(2), DType::F64, Fill::Positive);
    add_f32 => |d| Case::new(Add).float32(d.shape(2)).float32(d.shape(2));
    matmul_f32 => |d| Case::new(product(false, true)).float32([d[0], d[1]]).float32([d[2], d[1]]);
    softmax_f32 => |d| Case::new(Softmax).float32(d.shape(2));
    layer_norm_f32 => |d| Case::new(LayerNorm { eps: 1e-5 }).float32(d.shape(2)).float32([d[1]]).float32([d[1]]);
    relu => |d| Case::new(Unary(Relu)).float(d.shape(3));
    relu_grad => |d| Case::new(GradOf(Relu)).float(d.shape(2)).float(d.shape(2));
    gelu => |d| Case::new(Unary(Gelu { tanh: false })).float(d.shape(3));
    gelu_tanh_grad => |d| Case::new(GradOf(Gelu { tanh: true })).float(d.shape(2)).float(d.shape(2));
    bias_gelu => |d| Case::new(BiasAct(Gelu { tanh: false })).float(d.shape(3)).float([d[2]]);
    bias_gelu_grad => |d| Case::new(BiasActGrad(Gelu { tanh: false }))
        .float(d.shape(3)).float([d[2]]).float(d.shape(3));
    bias_silu_grad => |d| Case::new(BiasActGrad(Silu)).float(d.shape(2)).float([d[1]]).float(d.shape(2));
    exp => |d| Case::new(Unary(Exp)).float(d.shape(2));
    log => |d| Case::new(Unary(Log)).input(d.shape(2), DType::F64, Fill::Positive);
    sigmoid => |d| Case::new(Unary(Sigmoid)).float(d.shape(2));
    silu_grad => |d| Case::new(GradOf(Silu)).float(d.shape(2)).float(d.shape(2));
    tanh => |d| Case::new(Unary(Tanh)).float(d.shape(2));
    sqrt => |d| Case::new(Unary(Sqrt)).input(d.shape(2), DType::F64, Fill::Positive);
    rsqrt => |d| Case::new(Unary(Rsqrt)).input(d.shape(2), DType::F64, Fill::Positive);
    add_scalar => |d| Case::new(Unary(AddScalar { value: 1.5 })).float(d.shape(3));
    mul_scalar => |d| Case::new(Unary(MulScalar { value: -0.5 })).float(d.shape(3));
    pow_scalar => |d| Case::new(Unary(PowScalar { exponent: 3.0 })).float(d.shape(2));
    pow => |d| Case::new(Pow).input(d.shape(2), DType::F64, Fill::Positive).float([d[1]]);
    concat => |d| Case::new(Concat { axis: 1 }).float([d[0], d[1]]).float([d[0], d[2]]);
    narrow => |d| Case::new(Narrow { axis: -1, start: d[2] / 2, len: d[2] - d[2] / 2 }).float(d.shape(3));
    pad => |d| Case::new(Pad { axis: 0, start: 1, total: d[0] + 2 }).float(d.shape(2));
    permute => |d| Case::new(Permute { perm: vec![2, 0, 1] }).float(d.shape(3));
    split => |d| Case::new(Split { axis: 1, sizes: vec![d[1], d[2]] }).float([d[0], d[1] + d[2]]);
    max => |d| Case::new(Max { axes: vec![1], keepdim: false }).float(d.shape(3));
    max_grad => |d| Case::new(MaxGrad).input([d[0], d[1]], DType::F64, Fill::Ids(3))
        .input([d[0], 1], DType::F64, Fill::Ids(3)).float([d[0], 1]);
    mean => |d| Case::new(Mean { axes: vec![0], keepdim: true }).float(d.shape(2));
    fill => |d| Case::new(FillOp { value: 2.5 }).float(d.shape(2));
    masked_fill => |d| Case::new(MaskedFill { value: 0.0 }).float(d.shape(2)).input([d[1]], DType::Bool, Fill::Ids(2));
    where_select => |d| Case::new(Where).input(d.shape(2), DType::Bool, Fill::Ids(2)).float(d.shape(2)).float([d[1]]);
    dropout => |d| Case::new(Dropout::new(0.3, 7)).float(d.shape(3));
}

fn product(transpose_a: bool, transpose_b: bool) -> MatMul {
    MatMul { transpose_a, transpose_b }
}

/// The signatures the ops declare drive selection as the design expects: a Megatron MLP
/// (column-parallel then row-parallel linear) gets exactly one all-reduce.
#[test]
fn declared_signatures_give_megatron_one_all_reduce() {
    use meshflow_placement::select::{select, OpNode, SelectionGraph, Strategy, TensorSpec};
    use meshflow_placement::{CostConfig, Sbp};

    let placement = Placement::line(DeviceType::Cpu, 4).expect("a mesh");
    let meta = |rows, cols| TensorMeta::new([rows, cols], DType::F32);
    let (x, w1, h, w2) = (meta(16, 256), meta(256, 1024), meta(16, 1024), meta(1024, 256));
    let spec = |m: &TensorMeta| TensorSpec::new(m.shape.dims().to_vec(), 4);
    let sources = [Sbp::Broadcast, Sbp::Split(0), Sbp::Split(1)].map(|s| Signature::new([], [s]));
    let node = |name: &str, op: Option<&dyn Op>, inputs: &[&TensorMeta], output: &TensorMeta| {
        let metas: Vec<TensorMeta> = inputs.iter().map(|m| (*m).clone()).collect();
        let (signatures, flops) = match op {
            Some(op) => (op.signatures(&metas), op.flops(&metas)),
            None => (sources.to_vec(), 0),
        };
        let specs = inputs.iter().map(|m| spec(m)).collect();
        OpNode::new(name, placement.clone(), specs, vec![spec(output)], &signatures, flops)
            .expect("valid signatures")
    };
    let (matmul, gelu) = (product(false, false), Unary(Gelu { tanh: false }));
    let ops = [
        node("x", None, &[], &x).fix_output(0, Sbp::Broadcast),
        node("w1", None, &[], &w1).fix_output(0, Sbp::Split(1)),
        node("fc1", Some(&matmul), &[&x, &w1], &h),
        node("gelu", Some(&gelu), &[&h], &h),
        node("w2", None, &[], &w2).fix_output(0, Sbp::Split(0)),
        node("fc2", Some(&matmul), &[&h, &w2], &x),
        node("out", Some(&Neg), &[&x], &x).fix_output(0, Sbp::Broadcast),
    ];
    let mut graph = SelectionGraph::new();
    let ids: Vec<_> = ops.into_iter().map(|op| graph.add_op(op)).collect();
    let edges = [(0, 2, 0), (1, 2, 1), (2, 3, 0), (3, 5, 0), (4, 5, 1), (5, 6, 0)];
    for (producer, consumer, input) in edges {
        graph.connect(ids[producer], 0, ids[consumer], input).expect("matching tensors");
    }
    let report = select(&graph, &CostConfig::default(), Strategy::Search).expect("a selection");
    assert_eq!(report.count_steps("all-reduce"), 1, "{report}");
    assert_eq!(report.edges.len(), 1, "{report}");
    assert_eq!(report.ops[5].signature.outputs[0], NdSbp::from(Sbp::PartialSum), "{report}");
}
