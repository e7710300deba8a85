//! What the integration tests share: the token batches their GPTs train on, and the comparison
//! of two loss (or value) sequences.

// Each test binary compiles this module and uses only a part of it.
#![allow(dead_code)]

use meshflow::ops::Tensor as HostTensor;

/// Token ids `[batch, ctx]` and next-token targets `[batch, ctx]` below `vocab` for the step
/// `step`: token `k` of the step's stream is `(k * a + step * b + k / c) % vocab` for the
/// pattern `(a, b, c)`, so every run (and every process of a job) sees the same data.
pub fn token_batch(
    batch: usize,
    ctx: usize,
    vocab: usize,
    step: usize,
    (a, b, c): (usize, usize, usize),
) -> (HostTensor, HostTensor) {
    let tokens: Vec<i64> =
        (0..batch * (ctx + 1)).map(|k| ((k * a + step * b + k / c) % vocab) as i64).collect();
    let (x, y) = meshflow::data::inputs_and_targets(&tokens, batch, ctx);
    let x = HostTensor::from_vec(x, [batch, ctx]).expect("ids have batch * ctx elements");
    let y = HostTensor::from_vec(y, [batch, ctx]).expect("targets have batch * ctx elements");
    (x, y)
}

/// The pattern most tests train on.
pub const PATTERN: (usize, usize, usize) = (5, 3, 7);

/// `a` and `b` have the same length and differ by at most `tolerance` at every position.
pub fn assert_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tolerance, "{what}: [{k}] {x} vs {y} (all {a:?} vs {b:?})");
    }
}
