//! `meshflow bench` as a user runs it, for what the GPU parts do on a machine without a GPU:
//! `bench comm` says in one line why it has no NCCL rows and succeeds; `bench train --device
//! cuda` fails at once with the device's typed error (naming `cuda:0`), not a panic; `--device`
//! takes `cpu` and `cuda` only. On a GPU machine the same tests check the GPU rows instead.

use std::process::{Command, Output, Stdio};

const MESHFLOW: &str = env!("CARGO_BIN_EXE_meshflow");

/// `meshflow bench <args>` outside any launched job.
fn bench(args: &[&str]) -> Output {
    let mut command = Command::new(MESHFLOW);
    command.arg("bench").args(args).stdin(Stdio::null());
    for name in ["WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"] {
        command.env_remove(name);
    }
    command.output().expect("run meshflow")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether GPU 0 can be opened here (a build with `cuda` on a machine with a GPU).
fn has_gpu() -> bool {
    meshflow::ops::cuda::CudaDevice::new(0).is_ok()
}

#[test]
fn bench_comm_says_in_one_line_why_it_has_no_gpu_rows() {
    let output = bench(&["comm", "--ranks", "2", "--max-bytes", "8"]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all_to_all over 2 ranks (in-process)"), "{stdout}");
    let nccl_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("# nccl:")).collect();
    if meshflow::bench::nccl::usable_gpus().is_ok() {
        assert!(stdout.contains("(nccl)"), "GPU rows on a GPU machine: {stdout}");
        return;
    }
    assert_eq!(nccl_lines.len(), 1, "{stdout}");
    assert!(nccl_lines[0].starts_with("# nccl: GPU rows skipped ("), "{}", nccl_lines[0]);
    assert!(!stdout.contains("(nccl)"), "no GPU rows without a GPU: {stdout}");
}

#[test]
fn bench_train_on_cuda_without_a_gpu_is_the_typed_device_error() {
    if has_gpu() {
        return; // the GPU check runs `bench train --device cuda` there
    }
    let args = ["train", "--device", "cuda", "--strategies", "1", "--models", "mlp"];
    let output = bench(&[&args[..], &["--no-torch", "--seconds", "0.1"]].concat());
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("meshflow bench: device cuda:0: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing was timed before the device was opened.
    assert!(!text(&output.stdout).contains("# train"), "{}", text(&output.stdout));
}

#[test]
fn bench_device_takes_cpu_or_cuda() {
    let output = bench(&["train", "--device", "tpu"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("--device") && stderr.contains("cpu") && stderr.contains("cuda"));
    let help = text(&bench(&["--help"]).stdout);
    assert!(help.contains("--device <DEVICE>") && help.contains("[default: cpu]"), "{help}");
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    bench: meshflow::bench::BenchArgs,
}

#[test]
fn device_defaults_to_the_cpu_and_parses_cuda() {
    use clap::Parser;
    use meshflow::bench::train::TrainDevice;
    let parse = |args: &[&str]| Cli::try_parse_from(args).map(|cli| cli.bench);
    let plain = parse(&["bench", "train"]).expect("plain");
    assert_eq!(plain.device, TrainDevice::Cpu);
    let gpu = parse(&["bench", "train", "--device", "cuda", "--strategies", "1"]).expect("cuda");
    assert_eq!(
        (gpu.device, gpu.strategies.as_slice()),
        (TrainDevice::Cuda, &["1".to_string()][..])
    );
    assert!(parse(&["bench", "train", "--device", "gpu"]).is_err());
}

/// Counts and times that cannot be meant are refused by the flag parser, naming the flag, before
/// anything runs (a `--threads 0` ran one thread under a "0thr" label; `--seconds nan` timed
/// the fewest steps; `--seconds 1e300` panicked; `--peak-gflops nan` printed NaN %;
/// `--max-bytes 4` timed nothing; a strategy with a stray part ran without it).
#[test]
fn bench_refuses_counts_times_and_strategies_that_cannot_be_meant() {
    let train = ["train", "--models", "mlp", "--strategies", "1", "--no-torch"];
    for (flag, value, reason) in [
        ("--threads", "0", "must be at least 1"),
        ("--rounds", "0", "must be at least 1"),
        ("--min-steps", "0", "must be at least 1"),
        ("--seconds", "nan", "seconds above 0 and at most 604800"),
        ("--seconds", "0", "seconds above 0 and at most 604800"),
        ("--seconds", "1e300", "seconds above 0 and at most 604800"),
        ("--torch-timeout", "1e9", "seconds above 0 and at most 604800"),
        ("--peak-gflops", "nan", "must be a finite number above 0"),
        ("--peak-gflops", "0", "must be a finite number above 0"),
        ("--max-bytes", "4", "must be at least 8"),
        ("--threads", "two", "is not a count"),
    ] {
        let output = bench(&[&train[..], &[flag, value]].concat());
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(reason), "{flag} {value}: {stderr}");
    }
    let output = bench(&["train", "--models", "mlp", "--strategies", "dp2y", "--no-torch"]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("unknown strategy \"dp2y\"") && stderr.contains("\"y\""), "{stderr}");
}

/// A report to compare with that cannot be read, or a directory for the JSON or SVG that does
/// not exist (or a directory given as the file), fails the run before anything is measured (it failed after the whole run), naming
/// the file.
#[test]
fn bench_checks_the_files_it_reads_and_writes_before_measuring() {
    let scratch = tempfile::tempdir().expect("scratch");
    let missing = scratch.path().join("missing.json");
    let unwritable = scratch.path().join("no-such-directory").join("report.json");
    let train = ["train", "--models", "mlp", "--strategies", "1", "--no-torch"];
    let directory = scratch.path().to_path_buf();
    for (flag, path) in [
        ("--compare", &missing),
        ("--json", &unwritable),
        ("--svg", &unwritable),
        ("--json", &directory),
    ] {
        let output = bench(&[&train[..], &[flag, path.to_str().expect("utf-8")]].concat());
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert_eq!(output.status.code(), Some(1), "{flag}: {stdout}\n{stderr}");
        assert!(stderr.contains(&*path.to_string_lossy()), "{flag}: {stderr}");
        assert!(!stdout.contains("1dev×2thr"), "{flag}: measured before failing: {stdout}");
    }
}
