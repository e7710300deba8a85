//! Dropout: the mask is a pure function of (seed, logical index), so shards equal the whole.

mod common;

use std::sync::Arc;

use meshflow_ops::eager::Tape;
use meshflow_ops::ops::dropout::Dropout;
use meshflow_ops::ops::narrow::Narrow;
use meshflow_ops::{Context, DType, Emit, Op, Shape, Shard, Tensor};
use meshflow_placement::{Sbp, Signature};

use common::values;

fn run(op: &dyn Op, x: &Tensor) -> Tensor {
    op.forward(&Context::single_thread(), std::slice::from_ref(x)).unwrap().remove(0)
}

#[test]
fn drops_about_p_and_scales_the_rest() {
    let x = Tensor::ones([200, 100], DType::F32);
    let y = values(&run(&Dropout::new(0.25, 42), &x));
    let kept: Vec<f64> = y.iter().copied().filter(|&v| v != 0.0).collect();
    let fraction = 1.0 - kept.len() as f64 / y.len() as f64;
    assert!((fraction - 0.25).abs() < 0.02, "dropped {fraction}");
    assert!(kept.iter().all(|&v| (v - 1.0 / 0.75).abs() < 1e-6));
    assert_eq!(y, values(&run(&Dropout::new(0.25, 42), &x)), "same seed, same mask");
    assert_ne!(y, values(&run(&Dropout::new(0.25, 43), &x)), "another seed, another mask");
    assert_eq!(values(&run(&Dropout::new(0.0, 1), &x)), values(&x));
    assert!(values(&run(&Dropout::new(1.0, 1), &x)).iter().all(|&v| v == 0.0));
}

#[test]
fn each_shard_of_a_split_equals_its_slice_of_the_whole() {
    let logical = Shape::new([6, 10]);
    let x = Tensor::randn(logical.clone(), 0.0, 1.0, DType::F64, 3).unwrap();
    let whole = Dropout::new(0.5, 9);
    let expected = run(&whole, &x);
    for (axis, parts) in [(0usize, [0usize, 2, 6]), (1, [0, 3, 10])] {
        let signature = Signature::new([Sbp::Split(axis)], [Sbp::Split(axis)]);
        for w in parts.windows(2) {
            let (start, len) = (w[0], w[1] - w[0]);
            let narrow = Narrow { axis: axis as isize, start, len };
            let local = run(&narrow, &x);
            let mut offset = vec![0, 0];
            offset[axis] = start;
            let shard = Shard { local: local.meta().clone(), logical: logical.clone(), offset };
            let op = whole
                .localize(&signature, std::slice::from_ref(&shard), std::slice::from_ref(&shard))
                .unwrap()
                .unwrap();
            assert_eq!(values(&run(op.as_ref(), &local)), values(&run(&narrow, &expected)));
        }
    }
}

#[test]
fn gradient_uses_the_same_mask() {
    let mut tape = Tape::new(Context::single_thread());
    let x = tape.leaf(Tensor::randn([50], 0.0, 1.0, DType::F64, 1).unwrap());
    let y = tape.emit(Arc::new(Dropout::new(0.3, 5)), &[x]).unwrap()[0];
    let cot = tape.leaf(Tensor::ones([50], DType::F64));
    let dx = tape.gradients(&[y], &[cot], &[x]).unwrap()[0].unwrap();
    let (ys, xs, dxs) = (values(tape.tensor(y)), values(tape.tensor(x)), values(tape.tensor(dx)));
    for i in 0..50 {
        let scale = if ys[i] == 0.0 { 0.0 } else { 1.0 / 0.7 };
        assert!((dxs[i] - scale).abs() < 1e-12, "element {i}");
        assert!((ys[i] - xs[i] * scale).abs() < 1e-12, "element {i}");
    }
    assert!(Dropout::new(0.3, 5).is_stateful());
}
