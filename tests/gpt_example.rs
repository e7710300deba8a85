//! The GPT example as users run it: 20 steps on one device and the same command under
//! `meshflow launch` as two processes (DP2 with a device each, DP2×TP2 with two each, PP2 with a
//! stage each) print the same losses, and only rank 0 reports.
//!
//! The example's binary is the one `cargo test` builds beside the `meshflow` binary (it builds
//! the examples of the package before running any test).

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;

const MESHFLOW: &str = env!("CARGO_BIN_EXE_meshflow");
const STEPS: usize = 20;
/// A small model, so that 20 steps take well under a second.
const MODEL: [&str; 12] = [
    "--layers",
    "2",
    "--d-model",
    "64",
    "--ctx",
    "32",
    "--batch",
    "8",
    "--log-every",
    "1",
    "--sample",
    "0",
];

fn example() -> PathBuf {
    let dir = std::path::Path::new(MESHFLOW).parent().expect("target directory");
    let path = dir.join("examples").join("gpt");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build --example gpt`)",
        path.display()
    );
    path
}

fn succeeded(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    stdout
}

/// The losses of the lines `step N loss X …` that `prefix` starts, in step order.
fn losses(stdout: &str, prefix: &str) -> Vec<f32> {
    let mut found = Vec::new();
    for line in stdout.lines().filter_map(|l| l.strip_prefix(prefix)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["step", step, "loss", loss, ..] = words[..] {
            assert_eq!(step.parse::<usize>().unwrap(), found.len(), "{stdout}");
            found.push(loss.parse().unwrap());
        }
    }
    found
}

fn one_process(mesh: &[&str]) -> Vec<f32> {
    let output = Command::new(example())
        .args(MODEL)
        .args(["--steps", &STEPS.to_string()])
        .args(mesh)
        .env_remove("RANK")
        .env_remove("SLURM_PROCID")
        .env_remove("OMPI_COMM_WORLD_RANK")
        .output()
        .unwrap();
    losses(&succeeded(output, "one process"), "")
}

/// The losses rank 0 prints, after checking that rank 1 prints none.
fn two_processes(mesh: &[&str]) -> Vec<f32> {
    let output = common::launch_two(&example())
        .args(MODEL)
        .args(["--steps", &STEPS.to_string()])
        .args(mesh)
        .output()
        .unwrap();
    let stdout = succeeded(output, "meshflow launch");
    assert!(losses(&stdout, "[rank 1] ").is_empty(), "rank 1 reported:\n{stdout}");
    assert!(!stdout.contains("[rank 1] gpt:"), "rank 1 reported:\n{stdout}");
    losses(&stdout, "[rank 0] ")
}

fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!((a.len(), b.len()), (STEPS, STEPS), "{what}: {a:?} vs {b:?}");
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 2e-4, "{what} step {step}: {x} vs {y}");
    }
}

#[test]
fn the_gpt_example_under_launch_matches_one_device() {
    let one = one_process(&["--dp", "1", "--tp", "1"]);
    assert!(one[STEPS - 1] < one[0] - 0.5, "the loss did not fall: {one:?}");
    assert_same(&two_processes(&["--dp", "2", "--tp", "1"]), &one, "DP2 over 2 processes");
    assert_same(&two_processes(&["--dp", "2", "--tp", "2"]), &one, "DP2×TP2 over 2 processes");
    // A stage per process: the loss lives on the last stage, in process 1 only, and process 0
    // gets it too (it failed: "rank 1 returned no shard").
    let pp2 = ["--dp", "1", "--tp", "1", "--pp", "2", "--micro-batches", "2"];
    assert_same(&two_processes(&pp2), &one, "PP2 over 2 processes");
}

#[test]
fn a_mesh_that_does_not_split_over_the_processes_is_refused() {
    let output = common::launch_two(&example())
        .args(MODEL)
        .args(["--steps", "1", "--dp", "3", "--tp", "1"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("3 devices do not split evenly over the 2 processes"), "{text}");
}
