//! Kernels give the same result with 1 and several threads, on tensors large enough to be
//! split into parallel chunks, and in every float dtype.

mod common;

use std::sync::Arc;

use meshflow_ops::eager::Tape;
use meshflow_ops::ops::unary::Unary;
use meshflow_ops::ops::where_select::Where;
use meshflow_ops::ops::{add::Add, dropout::Dropout, gelu::Gelu, masked_fill::MaskedFill};
use meshflow_ops::ops::{max::Max, mean::Mean, mul::Mul, permute::Permute, sum::Sum};
use meshflow_ops::{Context, DType, Emit, OpRef, Tensor};

use common::values;

fn run(ctx: Context, op: &OpRef, inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let mut tape = Tape::new(ctx);
    let leaves: Vec<_> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let outputs = tape.emit(op.clone(), &leaves).unwrap();
    outputs.iter().map(|&v| values(tape.tensor(v))).collect()
}

#[test]
fn parallel_kernels_equal_serial_kernels() {
    let big = |seed| Tensor::randn([96, 1024], 0.0, 1.0, DType::F32, seed).unwrap();
    let (x, y) = (big(1), big(2));
    let row = Tensor::randn([1024], 0.0, 1.0, DType::F32, 3).unwrap();
    // Rows wider than a column reduction folds by row blocks: it goes by column ranges.
    let wide = Tensor::randn([3, 20_000], 0.0, 1.0, DType::F32, 5).unwrap();
    let mask =
        Tensor::randn([96, 1], 0.0, 1.0, DType::F32, 4).unwrap().to_dtype(DType::Bool).unwrap();
    let cases: Vec<(OpRef, Vec<Tensor>)> = vec![
        (Arc::new(Add), vec![x.clone(), y.clone()]),
        (Arc::new(Mul), vec![x.clone(), row.clone()]),
        (Arc::new(Unary(Gelu { tanh: false })), vec![x.clone()]),
        (Arc::new(Sum { axes: vec![1], keepdim: false }), vec![x.clone()]),
        (Arc::new(Sum { axes: vec![0], keepdim: true }), vec![x.clone()]),
        (Arc::new(Sum { axes: vec![0], keepdim: false }), vec![wide]),
        (Arc::new(Max { axes: vec![0], keepdim: false }), vec![x.clone()]),
        (Arc::new(Mean { axes: vec![], keepdim: false }), vec![x.clone()]),
        (Arc::new(Max { axes: vec![1], keepdim: false }), vec![x.clone()]),
        (Arc::new(Permute { perm: vec![1, 0] }), vec![x.clone()]),
        (Arc::new(Where), vec![mask.clone(), x.clone(), y.clone()]),
        (Arc::new(MaskedFill { value: f64::NEG_INFINITY }), vec![x.clone(), mask]),
        (Arc::new(Dropout::new(0.1, 7)), vec![x.clone()]),
    ];
    for (op, inputs) in &cases {
        let serial = run(Context::single_thread(), op, inputs);
        let parallel = run(Context::with_threads(3), op, inputs);
        assert_eq!(serial, parallel, "{}", op.name());
    }
}

#[test]
fn half_precision_kernels_compute_in_f32() {
    // A sum of 4096 ones accumulated in bf16 would stall at 256 (256 + 1 rounds to 256).
    for dtype in [DType::BF16, DType::F16] {
        let x = Tensor::full([70_000], 3.0, dtype);
        let y = Tensor::full([70_000], 0.5, dtype);
        let out = run(Context::with_threads(2), &(Arc::new(Mul) as OpRef), &[x, y]);
        assert!(out[0].iter().all(|&v| v == 1.5), "{dtype}");
        let sum = Sum { axes: vec![0], keepdim: false };
        let ones = Tensor::ones([4096], dtype);
        let total = run(Context::single_thread(), &(Arc::new(sum) as OpRef), &[ones]);
        assert_eq!(total[0], vec![4096.0], "{dtype}: accumulated in f32, not in {dtype}");
    }
}

/// A column reduction over a middle axis with several outer groups (`[3, 96, 64]` over axis 1:
/// each group folds its row blocks into partial rows that the next group reuses) gives every
/// group its own sums, on 1 and 3 threads.
#[test]
fn column_sums_of_several_groups_are_each_their_own() {
    let (outer, rows, columns) = (3, 96, 64);
    let data: Vec<f32> = (0..outer * rows * columns).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    let x = Tensor::from_vec(data.clone(), [outer, rows, columns]).unwrap();
    let mut expected = vec![0.0f64; outer * columns];
    for o in 0..outer {
        for r in 0..rows {
            for c in 0..columns {
                expected[o * columns + c] += f64::from(data[(o * rows + r) * columns + c]);
            }
        }
    }
    let op: OpRef = Arc::new(Sum { axes: vec![1], keepdim: false });
    for ctx in [Context::single_thread(), Context::with_threads(3)] {
        assert_eq!(run(ctx, &op, std::slice::from_ref(&x)), vec![expected.clone()]);
    }
}
