//! The eager tape and reverse-mode autodiff.

mod common;

use meshflow_ops::autodiff::gradients;
use meshflow_ops::eager::Tape;
use meshflow_ops::ops::{add::add, mul::mul, reshape::reshape, sum::sum};
use meshflow_ops::{Context, DType, Emit, Shape, Tensor};

use common::{tensor, values};

fn leaf(tape: &mut Tape, data: &[f64], shape: &[usize]) -> meshflow_ops::Value {
    tape.leaf(tensor(data.to_vec(), shape, DType::F64))
}

#[test]
fn gradients_accumulate_over_paths() {
    // y = sum(x·x + x) → dy/dx = 2x + 1
    let mut tape = Tape::new(Context::single_thread());
    let x = leaf(&mut tape, &[1.0, -2.0, 3.0], &[3]);
    let square = mul(&mut tape, x, x).unwrap();
    let both = add(&mut tape, square, x).unwrap();
    let y = sum(&mut tape, both, &[], false).unwrap();
    let one = leaf(&mut tape, &[1.0], &[]);
    let grads = tape.gradients(&[y], &[one], &[x]).unwrap();
    assert_eq!(values(tape.tensor(grads[0].unwrap())), vec![3.0, -3.0, 7.0]);
}

#[test]
fn unreachable_values_get_no_gradient() {
    let mut tape = Tape::new(Context::single_thread());
    let x = leaf(&mut tape, &[1.0, 2.0], &[2]);
    let z = leaf(&mut tape, &[5.0, 6.0], &[2]);
    let y = mul(&mut tape, x, x).unwrap();
    let cot = leaf(&mut tape, &[1.0, 1.0], &[2]);
    let grads = tape.gradients(&[y], &[cot], &[x, z]).unwrap();
    assert_eq!(values(tape.tensor(grads[0].unwrap())), vec![2.0, 4.0]);
    assert!(grads[1].is_none());
}

#[test]
fn broadcast_gradient_sums_back_to_input_shape() {
    // z = x[2,3] * b[3]; dz/db = Σ_rows x·cot
    let mut tape = Tape::new(Context::single_thread());
    let x = leaf(&mut tape, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = leaf(&mut tape, &[1.0, 1.0, 1.0], &[3]);
    let z = mul(&mut tape, x, b).unwrap();
    let cot = leaf(&mut tape, &[1.0; 6], &[2, 3]);
    let grads = tape.gradients(&[z], &[cot], &[b]).unwrap();
    let db = tape.tensor(grads[0].unwrap());
    assert_eq!(db.shape(), &Shape::new([3]));
    assert_eq!(values(db), vec![5.0, 7.0, 9.0]);
}

#[test]
fn gradients_is_reusable_on_any_emit() {
    // The free function over a node list: differentiate a copy of the tape's record.
    let mut tape = Tape::new(Context::single_thread());
    let x = leaf(&mut tape, &[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let flat = reshape(&mut tape, x, &Shape::new([4])).unwrap();
    let y = mul(&mut tape, flat, flat).unwrap();
    let cot = leaf(&mut tape, &[1.0; 4], &[4]);
    let nodes = tape.nodes().to_vec();
    assert_eq!(nodes.len(), 2);
    let grads = gradients(&mut tape, &nodes, &[y], &[cot], &[x]).unwrap();
    let dx = tape.tensor(grads[0].unwrap());
    assert_eq!(dx.dims(), &[2, 2]);
    assert_eq!(values(dx), vec![2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn cotangent_of_the_wrong_shape_is_an_error() {
    let mut tape = Tape::new(Context::single_thread());
    let x = leaf(&mut tape, &[1.0, 2.0], &[2]);
    let y = mul(&mut tape, x, x).unwrap();
    let cot = leaf(&mut tape, &[1.0, 1.0, 1.0], &[3]);
    common::expect_error(tape.gradients(&[y], &[cot], &[x]), &["cotangent", "[2]", "[3]"]);
}

#[test]
fn emit_checks_forward_against_inference() {
    let mut tape = Tape::new(Context::single_thread());
    let x = tape.leaf(Tensor::from_vec(vec![1i64, 2], [2]).unwrap());
    let error = common::expect_error(mul(&mut tape, x, x), &["mul", "i64"]);
    assert!(error.contains("float"));
    assert_eq!(tape.nodes().len(), 0);
    assert_eq!(tape.meta(x).dtype, DType::I64);
}
