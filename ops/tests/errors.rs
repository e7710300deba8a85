//! Bad input returns an error naming the op, the shapes and the dtypes — never a panic.

#![allow(clippy::cloned_ref_to_slice_refs)] // `&[x.clone()]` reads best in these tables

mod common;

use std::sync::Arc;

use meshflow_ops::eager::Tape;
use meshflow_ops::ops::unary::{GradOf, Unary};
use meshflow_ops::ops::where_select::Where;
use meshflow_ops::ops::{add::Add, broadcast_to::BroadcastTo, cast::Cast, concat::Concat};
use meshflow_ops::ops::{div::Div, dropout::Dropout, exp::Exp, fill::Fill, gelu::Gelu};
use meshflow_ops::ops::{masked_fill::MaskedFill, max::Max, max::MaxGrad, mean::Mean, mul::Mul};
use meshflow_ops::ops::{narrow::Narrow, narrow::Pad, neg::Neg, permute::Permute, pow::Pow};
use meshflow_ops::ops::{relu::Relu, reshape::Reshape, split::Split, sub::Sub, sum::Sum};
use meshflow_ops::{Context, DType, Emit, OpRef, Shape, Tensor};

use common::expect_error;

fn f32s(shape: &[usize]) -> Tensor {
    Tensor::ones(shape.to_vec(), DType::F32)
}

/// Runs `op` on `inputs` through a tape (inference first) and expects an error with `words`.
fn rejects(op: OpRef, inputs: &[Tensor], words: &[&str]) {
    let mut tape = Tape::new(Context::single_thread());
    let values: Vec<_> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    expect_error(tape.emit(op.clone(), &values), words);
    expect_error(op.forward(&Context::single_thread(), inputs), &[op.name()]);
}

#[test]
fn broadcasting_ops_name_both_shapes() {
    for op in [Arc::new(Add) as OpRef, Arc::new(Sub), Arc::new(Mul), Arc::new(Div), Arc::new(Pow)] {
        let name = op.name();
        rejects(op, &[f32s(&[2, 3]), f32s(&[4])], &[name, "[2, 3]", "[4]"]);
    }
    let mixed = [f32s(&[2]), Tensor::ones([2], DType::F64)];
    rejects(Arc::new(Mul), &mixed, &["mul", "f32", "f64"]);
    let ints = [Tensor::ones([2], DType::I64), Tensor::ones([2], DType::I64)];
    rejects(Arc::new(Add), &ints, &["add", "i64"]);
    rejects(Arc::new(Add), &[f32s(&[2])], &["add", "expected 2", "got 1"]);
}

#[test]
fn reductions_reject_bad_axes_and_empty_axes() {
    let x = f32s(&[2, 3]);
    rejects(
        Arc::new(Sum { axes: vec![2], keepdim: false }),
        &[x.clone()],
        &["sum", "axis 2", "[2, 3]"],
    );
    rejects(Arc::new(Sum { axes: vec![-3], keepdim: false }), &[x.clone()], &["sum", "axis -3"]);
    rejects(
        Arc::new(Mean { axes: vec![1, -1], keepdim: false }),
        &[x.clone()],
        &["mean", "repeat"],
    );
    let empty = f32s(&[2, 0]);
    rejects(
        Arc::new(Max { axes: vec![1], keepdim: false }),
        &[empty.clone()],
        &["max", "[2, 0]", "empty"],
    );
    rejects(
        Arc::new(Mean { axes: vec![1], keepdim: false }),
        &[empty.clone()],
        &["mean", "[2, 0]"],
    );
    let ints = Tensor::ones([3], DType::I32);
    rejects(Arc::new(Sum { axes: vec![0], keepdim: false }), &[ints], &["sum", "i32"]);
    // A sum over an empty axis is allowed (torch gives zeros).
    let sum = Sum { axes: vec![1], keepdim: false };
    let out = meshflow_ops::Op::forward(&sum, &Context::single_thread(), &[empty]).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
}

#[test]
fn unary_ops_need_floats() {
    let ints = [Tensor::ones([2], DType::I64)];
    rejects(Arc::new(Unary(Exp)), &ints, &["exp", "i64"]);
    rejects(Arc::new(Unary(Gelu { tanh: false })), &ints, &["gelu", "i64"]);
    rejects(Arc::new(Neg), &ints, &["neg", "i64"]);
    rejects(Arc::new(GradOf(Relu)), &[f32s(&[2]), f32s(&[3])], &["relu_grad", "[2]", "[3]"]);
    rejects(Arc::new(Dropout::new(1.5, 0)), &[f32s(&[2])], &["dropout", "1.5"]);
}

#[test]
fn shape_ops_name_the_problem() {
    let x = f32s(&[2, 3]);
    rejects(
        Arc::new(Reshape { shape: Shape::new([4]) }),
        &[x.clone()],
        &["reshape", "[2, 3]", "[4]"],
    );
    rejects(
        Arc::new(BroadcastTo { shape: Shape::new([4, 2]) }),
        &[x.clone()],
        &["broadcast_to", "[2, 3]"],
    );
    rejects(Arc::new(Permute { perm: vec![0, 0] }), &[x.clone()], &["permute", "[2, 3]", "[0, 0]"]);
    rejects(Arc::new(Permute { perm: vec![1] }), &[x.clone()], &["permute", "[2, 3]"]);
    let narrow = Narrow { axis: 1, start: 2, len: 2 };
    rejects(Arc::new(narrow), &[x.clone()], &["narrow", "[2, 3]", "2..4"]);
    rejects(Arc::new(Narrow { axis: 5, start: 0, len: 1 }), &[x.clone()], &["narrow", "axis 5"]);
    rejects(Arc::new(Pad { axis: 0, start: 1, total: 2 }), &[x.clone()], &["pad", "[2, 3]"]);
    let concat = Arc::new(Concat { axis: 0 });
    rejects(concat.clone(), &[x.clone(), f32s(&[2, 4])], &["concat", "[2, 3]", "[2, 4]"]);
    rejects(concat, &[x.clone(), Tensor::ones([2, 3], DType::F64)], &["concat", "f64"]);
    rejects(Arc::new(Concat { axis: 0 }), &[], &["concat"]);
    rejects(
        Arc::new(Split { axis: 1, sizes: vec![1, 1] }),
        &[x.clone()],
        &["split", "[2, 3]", "[1, 1]"],
    );
}

#[test]
fn selection_ops_check_masks() {
    let x = f32s(&[2, 3]);
    let mask = Tensor::zeros([3], DType::Bool);
    rejects(Arc::new(Where), &[x.clone(), x.clone(), x.clone()], &["where", "f32"]);
    rejects(Arc::new(Where), &[mask.clone(), x.clone(), f32s(&[4])], &["where", "[2, 3]", "[4]"]);
    let fill = Arc::new(MaskedFill { value: 0.0 });
    rejects(
        fill.clone(),
        &[x.clone(), Tensor::zeros([2], DType::Bool)],
        &["masked_fill", "[2, 3]", "[2]"],
    );
    rejects(fill, &[x.clone(), f32s(&[3])], &["masked_fill", "f32"]);
    let grad = [x.clone(), f32s(&[2, 1]), f32s(&[3, 1])];
    rejects(Arc::new(MaxGrad), &grad, &["max_grad", "[2, 3]"]);
}

#[test]
fn no_op_panics_on_missing_inputs() {
    let ops: Vec<OpRef> = vec![
        Arc::new(Add),
        Arc::new(Neg),
        Arc::new(Unary(Exp)),
        Arc::new(GradOf(Relu)),
        Arc::new(Sum::default()),
        Arc::new(Mean::default()),
        Arc::new(Max::default()),
        Arc::new(MaxGrad),
        Arc::new(Reshape { shape: Shape::new([1]) }),
        Arc::new(BroadcastTo { shape: Shape::new([1]) }),
        Arc::new(Cast { dtype: DType::F32 }),
        Arc::new(Permute { perm: vec![] }),
        Arc::new(Narrow { axis: 0, start: 0, len: 0 }),
        Arc::new(Pad { axis: 0, start: 0, total: 0 }),
        Arc::new(Concat { axis: 0 }),
        Arc::new(Split { axis: 0, sizes: vec![1] }),
        Arc::new(Fill { value: 0.0 }),
        Arc::new(Where),
        Arc::new(MaskedFill { value: 0.0 }),
        Arc::new(Dropout::new(0.1, 0)),
    ];
    for op in ops {
        assert_eq!(op.flops(&[]), 0, "{}", op.name());
        assert_eq!(op.matrix_flops(&[]), 0, "{}", op.name());
        let signatures = op.signatures(&[]);
        assert!(signatures.iter().all(|s| s.inputs.is_empty() || s.outputs.len() == 1));
        let result = op.forward(&Context::single_thread(), &[]);
        assert!(result.is_err(), "{} accepted no inputs", op.name());
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(op.name()), "{message}");
    }
}
