//! Every core op against PyTorch (ops/tests/golden/core.safetensors, made by
//! scripts/golden/core.py): forward values, gradients, and gradients against finite differences.

mod common;

use meshflow_ops::ops::{add::Add, broadcast_to::BroadcastTo, cast::Cast, div::Div, mul::Mul};
use meshflow_ops::ops::{reshape::Reshape, sub::Sub, sum::Sum};
use meshflow_ops::{DType, OpRef, Shape};

use common::{check_group, op, Case};

fn dtype(name: &str) -> DType {
    DType::ALL.into_iter().find(|d| d.name() == name).expect("known dtype")
}

fn make(case: &Case) -> Option<OpRef> {
    Some(match case.op.as_str() {
        "add" => op(Add),
        "sub" => op(Sub),
        "mul" => op(Mul),
        "div" => op(Div),
        "sum" => op(Sum { axes: case.axes("axes"), keepdim: case.flag("keepdim") }),
        "reshape" => op(Reshape { shape: Shape::new(case.sizes("shape")) }),
        "broadcast_to" => op(BroadcastTo { shape: Shape::new(case.sizes("shape")) }),
        "cast" => op(Cast { dtype: dtype(&case.text("dtype")) }),
        _ => return None,
    })
}

#[test]
fn core_ops_match_pytorch_and_finite_differences() {
    let checked = check_group("core", make);
    assert!(checked >= 60, "only {checked} cases");
}
