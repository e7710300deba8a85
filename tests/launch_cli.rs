//! `meshflow launch` as a user sees it: errors for bad flags and missing settings, the workers'
//! environment, rank-prefixed output, the failure report, restarts, signal forwarding.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

const MESHFLOW: &str = env!("CARGO_BIN_EXE_meshflow");

/// `meshflow launch <args>` with no scheduler or torchrun variables inherited.
fn launch(args: &[&str]) -> Command {
    let mut command = Command::new(MESHFLOW);
    command.arg("launch").args(args).stdin(Stdio::null());
    for name in ["NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"]
    {
        command.env_remove(name);
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run meshflow")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clap-style usage error (status 2, `error:` and a usage line) mentioning `needles`.
fn assert_usage_error(output: &Output, needles: &[&str]) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(stderr.contains("Usage:") || stderr.contains("--help"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
}

#[test]
fn a_missing_program_or_bad_flag_is_a_usage_error() {
    assert_usage_error(&run(&mut launch(&[])), &["<PROGRAM>"]);
    assert_usage_error(&run(&mut launch(&["--nproc-per-node", "0", "true"])), &["between 1"]);
    assert_usage_error(&run(&mut launch(&["--bogus", "true"])), &["--bogus"]);
    assert_usage_error(&run(&mut launch(&["--master-port", "99999", "true"])), &["99999"]);
}

#[test]
fn several_nodes_need_a_node_rank_and_a_secret_file() {
    let output = run(&mut launch(&["--nnodes", "2", "true"]));
    assert_usage_error(&output, &["--node-rank", "NODE_RANK", "srun"]);
    let output = run(&mut launch(&["--nnodes", "2", "--node-rank", "1", "true"]));
    assert_usage_error(&output, &["--secret-file", "openssl rand"]);
    let output = run(&mut launch(&["--nnodes", "2", "--node-rank", "2", "true"]));
    assert_usage_error(&output, &["--node-rank", "below --nnodes"]);
}

#[test]
fn partial_scheduler_environment_says_what_is_missing() {
    let output = run(launch(&["true"]).env("SLURM_PROCID", "0"));
    assert_usage_error(&output, &["SLURM_NTASKS", "srun"]);
    let output = run(launch(&["true"]).env("OMPI_COMM_WORLD_RANK", "x"));
    assert_usage_error(&output, &["OMPI_COMM_WORLD_RANK", "\"x\""]);
}

#[test]
fn workers_get_torchrun_variables_and_prefixed_output() {
    let script = "echo \"env $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK \
                  $MASTER_ADDR $MASTER_PORT\"; stat -c %a \"$MESHFLOW_SECRET_FILE\"";
    let output = run(&mut launch(&[
        "--nproc-per-node",
        "3",
        "--master-port",
        "4321",
        "--",
        "sh",
        "-c",
        script,
    ]));
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for rank in 0..3 {
        let expected = format!("[rank {rank}] env {rank} 3 {rank} 3 0 127.0.0.1 4321");
        assert!(stdout.lines().any(|line| line == expected), "{expected:?} not in:\n{stdout}");
    }
    assert_eq!(stdout.matches("] 600").count(), 3, "{stdout}");
}

#[test]
fn a_failed_worker_is_named_with_its_status_and_last_lines() {
    let script = "if [ \"$RANK\" = 1 ]; then echo first words; echo last words; exit 3; fi; \
                  exec sleep 30";
    let started = Instant::now();
    let output = run(&mut launch(&[
        "--nproc-per-node",
        "3",
        "--stop-grace-secs",
        "2",
        "--",
        "sh",
        "-c",
        script,
    ]));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rank 1 (pid"), "{stderr}");
    assert!(stderr.contains("failed: exit status 3"), "{stderr}");
    assert!(stderr.contains("last lines of rank 1:\n    first words\n    last words"), "{stderr}");
    // The sleeping workers were stopped rather than waited for (a bound, not a benchmark).
    assert!(started.elapsed() < Duration::from_secs(25), "{stderr}");
}

#[test]
fn max_restarts_restarts_the_whole_group() {
    let script = "echo \"attempt $MESHFLOW_RESTART_COUNT\"; \
                  [ \"$MESHFLOW_RESTART_COUNT\" = 1 ] || [ \"$RANK\" = 0 ] || exit 7";
    let directory = tempfile::tempdir().expect("tempdir");
    let log_dir = directory.path().to_str().expect("utf-8 path");
    let output = run(&mut launch(&[
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--log-dir",
        log_dir,
        "--",
        "sh",
        "-c",
        script,
    ]));
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 failed (exit status 7); restarting the group (1 of 2)"));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("[rank 0] attempt 1") && stdout.contains("[rank 1] attempt 1"));
    let log = std::fs::read_to_string(directory.path().join("rank1.log")).expect("rank1.log");
    assert_eq!(log, "attempt 0\nattempt 1\n");
}

#[test]
fn sigterm_is_forwarded_to_every_worker() {
    let script = "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.05; done";
    let child = launch(&["--nproc-per-node", "2", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = Pid::from_raw(child.id() as i32).expect("pid");
    // Give the workers time to install their trap (bounded by the wait below, not measured).
    std::thread::sleep(Duration::from_millis(700));
    kill_process(pid, Signal::TERM).expect("kill");
    let output = child.wait_with_output().expect("wait");
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(128 + 15), "{stdout}{}", text(&output.stderr));
    assert!(
        stdout.contains("[rank 0] got TERM") && stdout.contains("[rank 1] got TERM"),
        "{stdout}"
    );
}

#[test]
fn a_worker_alone_is_a_world_of_one_and_bad_worker_environment_is_named() {
    let output = run(Command::new(MESHFLOW)
        .args(["selftest", "--rounds", "2"])
        .env_remove("RANK")
        .env_remove("SLURM_PROCID")
        .env_remove("OMPI_COMM_WORLD_RANK"));
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("joined as rank 0 of 1"), "{stdout}");
    assert!(stdout.contains("ok, 2 rounds, last sum 2"), "{stdout}");
    let output = run(Command::new(MESHFLOW).args(["selftest"]).env("RANK", "1"));
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout.contains("WORLD_SIZE is not set"), "{stdout}");
}

/// A log directory that cannot be made fails the launch, naming it, before any worker runs
/// (the error said only "No such file or directory", after the first worker had started).
#[test]
fn a_log_dir_that_cannot_be_made_is_named_and_no_worker_runs() {
    let directory = tempfile::tempdir().expect("tempdir");
    let file = directory.path().join("file");
    std::fs::write(&file, b"not a directory").expect("file");
    let log_dir = file.join("logs");
    let marker = directory.path().join("ran");
    let script = format!("touch {}", marker.display());
    let log_dir_text = log_dir.to_str().expect("utf-8 path");
    let output = run(&mut launch(&["--log-dir", log_dir_text, "--", "sh", "-c", &script]));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("--log-dir {log_dir_text}")), "{stderr}");
    assert!(!marker.exists(), "a worker ran: {stderr}");
}
