//! What the integration tests share: the token batches their GPTs train on, the comparison of
//! two loss (or value) sequences, and the command that launches two processes of a job.

// Each test binary compiles this module and uses only a part of it.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;

use meshflow::ops::Tensor as HostTensor;

/// `meshflow launch --nproc-per-node 2` on a free loopback port, starting `program` (the caller
/// adds its arguments), with no launcher's environment inherited from the test's own.
pub fn launch_two(program: &Path) -> Command {
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshflow"));
    command.args(["launch", "--nproc-per-node", "2", "--master-port", &port.to_string(), "--"]);
    command.arg(program);
    for name in ["MASTER_ADDR", "MASTER_PORT", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"] {
        command.env_remove(name);
    }
    command
}

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
