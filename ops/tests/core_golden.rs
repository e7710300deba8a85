//! Every core op against PyTorch (ops/tests/golden/core.safetensors, made by
//! scripts/golden/core.py): forward values, gradients, and gradients against finite differences.

mod common;

use meshflow_ops::ops::unary::Unary;
use meshflow_ops::ops::{add::Add, broadcast_to::BroadcastTo, cast::Cast, concat::Concat};
use meshflow_ops::ops::{add_scalar::AddScalar, div::Div, exp::Exp, fill::Fill, gelu::Gelu};
use meshflow_ops::ops::{log::Log, masked_fill::MaskedFill, max::Max, mean::Mean, mul::Mul};
use meshflow_ops::ops::{mul_scalar::MulScalar, narrow::Narrow, permute::Permute, pow::Pow};
use meshflow_ops::ops::{pow_scalar::PowScalar, relu::Relu, reshape::Reshape, rsqrt::Rsqrt};
use meshflow_ops::ops::{sigmoid::Sigmoid, silu::Silu, split::Split, sqrt::Sqrt, sub::Sub};
use meshflow_ops::ops::{sum::Sum, tanh::Tanh, where_select::Where};
use meshflow_ops::{DType, OpRef, Shape};

use common::{check_group, op, Case};

fn dtype(name: &str) -> DType {
    DType::ALL.into_iter().find(|d| d.name() == name).expect("known dtype")
}

fn make_unary(case: &Case) -> Option<OpRef> {
    Some(match case.op.as_str() {
        "exp" => op(Unary(Exp)),
        "log" => op(Unary(Log)),
        "sqrt" => op(Unary(Sqrt)),
        "rsqrt" => op(Unary(Rsqrt)),
        "relu" => op(Unary(Relu)),
        "silu" => op(Unary(Silu)),
        "tanh" => op(Unary(Tanh)),
        "sigmoid" => op(Unary(Sigmoid)),
        "gelu" => op(Unary(Gelu { tanh: case.flag("tanh") })),
        "add_scalar" => op(Unary(AddScalar { value: case.float("value") })),
        "mul_scalar" => op(Unary(MulScalar { value: case.float("value") })),
        "pow_scalar" => op(Unary(PowScalar { exponent: case.float("exponent") })),
        _ => return None,
    })
}

fn make(case: &Case) -> Option<OpRef> {
    Some(match case.op.as_str() {
        "add" => op(Add),
        "sub" => op(Sub),
        "mul" => op(Mul),
        "div" => op(Div),
        "pow" => op(Pow),
        "sum" => op(Sum { axes: case.axes("axes"), keepdim: case.flag("keepdim") }),
        "mean" => op(Mean { axes: case.axes("axes"), keepdim: case.flag("keepdim") }),
        "max" => op(Max { axes: case.axes("axes"), keepdim: case.flag("keepdim") }),
        "reshape" => op(Reshape { shape: Shape::new(case.sizes("shape")) }),
        "broadcast_to" => op(BroadcastTo { shape: Shape::new(case.sizes("shape")) }),
        "cast" => op(Cast { dtype: dtype(&case.text("dtype")) }),
        "permute" => op(Permute { perm: case.sizes("perm") }),
        "narrow" => op(Narrow {
            axis: case.int("axis") as isize,
            start: case.int("start") as usize,
            len: case.int("len") as usize,
        }),
        "concat" => op(Concat { axis: case.int("axis") as isize }),
        "split" => op(Split { axis: case.int("axis") as isize, sizes: case.sizes("sizes") }),
        "where" => op(Where),
        "masked_fill" => op(MaskedFill { value: case.float("value") }),
        "fill" => op(Fill { value: case.float("value") }),
        _ => return make_unary(case),
    })
}

#[test]
fn core_ops_match_pytorch_and_finite_differences() {
    let checked = check_group("core", make);
    assert!(checked >= 140, "only {checked} cases");
}
