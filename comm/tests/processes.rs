//! Collectives across real processes on loopback: the test binary re-runs itself as children
//! (the `child_entry` test, ignored in normal runs), which meet through address files and QUIC.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshflow_comm::quic::{JobSecret, QuicConfig, QuicEndpoint, QuicTransport};
use meshflow_comm::{Communicator, Rank, ReduceOp, Transport, TransportCommunicator};
use meshflow_ops::{DType, Tensor};

const ROLE: &str = "MESHFLOW_COMM_TEST_ROLE";
const SECRET: &str = "MESHFLOW_COMM_TEST_SECRET";
/// Exit code of a survivor that saw the collective fail, as it should.
const FAILED_AS_EXPECTED: i32 = 3;

/// Starts `size` children of `scenario`; each writes its output to `<rank>.out` in `directory`
/// (read by [`outputs`] when a test fails), not into the test run's own output, where the
/// children's lines interleaved with the harness' results.
fn spawn_world(scenario: &str, size: usize, directory: &Path) -> Vec<Child> {
    let secret = JobSecret::generate().expect("secret");
    (0..size)
        .map(|rank| {
            let out = std::fs::File::create(directory.join(format!("{rank}.out"))).expect("out");
            Command::new(std::env::current_exe().expect("test binary"))
                .args(["child_entry", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
                .env(ROLE, format!("{scenario}:{rank}:{size}:{}", directory.display()))
                .env(SECRET, secret.expose_hex())
                .stdout(out.try_clone().expect("out"))
                .stderr(out)
                .spawn()
                .expect("spawn child")
        })
        .collect()
}

/// What the children of a world wrote, rank by rank, for a failing assertion's message.
fn outputs(directory: &Path, size: usize) -> String {
    let read = |rank: usize| {
        let path = directory.join(format!("{rank}.out"));
        std::fs::read_to_string(&path).unwrap_or_else(|error| format!("({error})"))
    };
    (0..size).map(|rank| format!("--- rank {rank}:\n{}", read(rank))).collect()
}

/// Waits for every child (killing all at `limit`); returns their exit codes.
fn wait_all(children: &mut [Child], limit: Duration) -> Vec<Option<i32>> {
    let deadline = Instant::now() + limit;
    let mut codes = vec![None; children.len()];
    let mut done = vec![false; children.len()];
    while done.iter().any(|finished| !finished) && Instant::now() < deadline {
        for (index, child) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                codes[index] = status.code();
                done[index] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (index, child) in children.iter_mut().enumerate() {
        if !done[index] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    codes
}

/// A fresh directory for one world's address files, removed when dropped (also when the test
/// fails an assertion), so that runs leave nothing in the temporary directory.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("meshflow-comm-{name}-"))
        .tempdir()
        .expect("scratch directory")
}

#[test]
fn every_collective_across_two_to_four_processes() {
    for size in [2, 3, 4] {
        let directory = scratch(&format!("collectives-{size}"));
        let mut children = spawn_world("collectives", size, directory.path());
        let codes = wait_all(&mut children, Duration::from_secs(90));
        let outputs = outputs(directory.path(), size);
        assert_eq!(codes, vec![Some(0); size], "child exit codes for {size} processes\n{outputs}");
    }
}

#[test]
fn survivors_fail_within_bounded_time_when_a_peer_is_killed_mid_collective() {
    let world = scratch("kill");
    let directory = world.path();
    let mut children = spawn_world("kill", 3, directory);
    let ready = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|rank| !directory.join(format!("{rank}.ready")).exists())
        && Instant::now() < ready
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300)); // let them get deep into the all-reduce loop
    children[2].kill().expect("kill rank 2");
    let killed_at = Instant::now();
    let codes = wait_all(&mut children[..2], Duration::from_secs(30));
    let _ = children[2].wait();
    let outputs = outputs(directory, 3);
    assert_eq!(codes, vec![Some(FAILED_AS_EXPECTED); 2], "survivors must report it\n{outputs}");
    assert!(killed_at.elapsed() < Duration::from_secs(25), "took {:?}", killed_at.elapsed());
}

#[test]
#[ignore = "entry point of the child processes spawned by the tests above"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let parts: Vec<&str> = role.splitn(4, ':').collect();
    let [scenario, rank, size, directory] = parts[..] else { panic!("bad role {role}") };
    let (rank, size): (usize, usize) = (rank.parse().expect("rank"), size.parse().expect("size"));
    let directory = Path::new(directory);
    let secret = JobSecret::from_hex(&std::env::var(SECRET).expect("secret")).expect("hex");
    let timeout = if scenario == "kill" { Duration::from_secs(3) } else { Duration::from_secs(30) };
    let config = QuicConfig::default().with_timeouts(timeout);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let endpoint = QuicEndpoint::bind(loopback, Rank(rank), secret, config).expect("bind");
    let addresses =
        exchange_addresses(directory, rank, size, endpoint.local_address().expect("address"));
    let transport: Arc<dyn Transport> =
        Arc::new(QuicTransport::connect_mesh(endpoint, &addresses).expect("mesh"));
    let mut group =
        TransportCommunicator::world(transport).expect("group").with_small_message_bytes(1 << 10);
    if scenario == "kill" {
        std::fs::write(directory.join(format!("{rank}.ready")), b"").expect("ready file");
        let tensor = Tensor::from_vec(vec![1.0f32; 1 << 18], [1 << 18]).expect("tensor");
        loop {
            if let Err(error) = group.all_reduce(&tensor, ReduceOp::Sum) {
                eprintln!("rank {rank}: {error}");
                std::process::exit(FAILED_AS_EXPECTED);
            }
        }
    }
    for dtype in common::DTYPES {
        common::check_all_collectives(&mut group, dtype, dtype == DType::F32);
    }
}

/// Publishes this rank's address as a file and reads everyone's.
fn exchange_addresses(
    directory: &Path,
    rank: usize,
    size: usize,
    mine: SocketAddr,
) -> Vec<SocketAddr> {
    let temporary = directory.join(format!("{rank}.tmp"));
    std::fs::write(&temporary, mine.to_string()).expect("address file");
    std::fs::rename(&temporary, directory.join(format!("{rank}.addr"))).expect("publish address");
    let deadline = Instant::now() + Duration::from_secs(30);
    (0..size)
        .map(|peer| loop {
            if let Ok(text) = std::fs::read_to_string(directory.join(format!("{peer}.addr"))) {
                break text.parse().expect("address");
            }
            assert!(Instant::now() < deadline, "rank {peer} never published its address");
            std::thread::sleep(Duration::from_millis(10));
        })
        .collect()
}
