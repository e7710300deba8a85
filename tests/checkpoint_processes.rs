//! Checkpoints of a session of several processes: a GPT with dropout trained data parallel over
//! two processes of one `meshflow launch` job saves a checkpoint (each process writes its own
//! rank's file, rank 0 the index) and gathers its whole variables; a single-device session in
//! this process loads that checkpoint and continues with the losses the job had, dropout masks
//! included (the step counter travels in the checkpoint).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshflow::checkpoint::{self, LoadOptions};
use meshflow::dist::{self, JoinOptions};
use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, Placement};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::{Graph, Tensor};

mod common;
use common::token_batch;

const CONFIG: GptConfig = GptConfig { vocab: 16, ctx: 8, n_layer: 2, n_head: 2, d_model: 16 };
const BATCH: usize = 4;
/// Steps before the save, and after it.
const BEFORE: usize = 3;
const AFTER: usize = 2;
/// Where the worker saves (set by the test for the launched processes).
const DIR_VARIABLE: &str = "MESHFLOW_TEST_CHECKPOINT_DIR";

/// A training session of the GPT (dropout 0.1) on `devices` data-parallel devices.
fn session(devices: usize, config: SessionConfig) -> (Session, Tensor, Tensor) {
    let placement = Placement::line(DeviceType::Cpu, devices).unwrap();
    let layouts = Layouts { placement, data_axis: (devices > 1).then_some(0), tensor_axis: None };
    let g = Graph::new();
    let (shape, batch) = ([BATCH, CONFIG.ctx], Some(layouts.batch()));
    let ids = g.input("ids", shape, DType::I64, &layouts.placement, batch.clone()).unwrap();
    let targets = g.input("targets", shape, DType::I64, &layouts.placement, batch).unwrap();
    let model = Gpt::new(&g, CONFIG, &layouts, WeightInit { std: 0.02, seed: 3 }).unwrap();
    let loss = model.with_dropout(0.1, 9).loss(&ids, &targets).unwrap();
    let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(1e-2) });
    let training = Training::new(&loss, optimizer, Schedule::Constant);
    let config = SessionConfig { devices, ..config };
    (Session::new(&g, &[&loss], Some(training), config).unwrap(), ids, targets)
}

/// The loss of the step with the batch of position `step`.
fn step(session: &mut Session, ids: &Tensor, targets: &Tensor, step: usize) -> f32 {
    let (x, y) = token_batch(BATCH, CONFIG.ctx, CONFIG.vocab, step, (7, 5, 3));
    let feeds = [(ids, x), (targets, y)];
    session.step(&feeds).unwrap()[0].to_vec::<f32>().unwrap()[0]
}

/// The sum of every element of every f32 variable (a checksum of the gathered values).
fn checksum(variables: &[(String, HostTensor)]) -> f64 {
    let f32s = variables.iter().filter(|(_, t)| t.dtype() == DType::F32);
    f32s.flat_map(|(_, t)| t.to_vec::<f32>().unwrap()).map(f64::from).sum()
}

/// The worker: one rank of the job `meshflow launch` started (run by the test below).
#[test]
#[ignore = "run by a_job_saves_and_one_device_continues under meshflow launch"]
fn checkpoint_worker() {
    let dir = std::env::var(DIR_VARIABLE).expect("checkpoint directory");
    let world = dist::init().expect("launch environment");
    let job = Arc::new(world.join(&JoinOptions::default()).expect("join"));
    let config = SessionConfig {
        job: Some(Arc::clone(&job)),
        timeout: Duration::from_secs(30),
        ..SessionConfig::default()
    };
    let (mut session, ids, targets) = session(2, config);
    for k in 0..BEFORE {
        step(&mut session, &ids, &targets, k);
    }
    // A destination that is not a checkpoint is refused on both ranks (rank 0 checks it, the
    // other hears why), and the job's next save goes on.
    let refused = checkpoint::save(&session, blocked(Path::new(&dir))).expect_err("refused");
    println!("REFUSED {} {refused}", world.rank);
    let index = checkpoint::save(&session, &dir).expect("save");
    assert_eq!(index.steps_done, BEFORE as u64);
    let partial = session.variables().expect_err("this process holds only its own ranks");
    assert!(partial.to_string().contains("gather_variables"), "{partial}");
    let gathered = session.gather_variables().expect("gather");
    println!("GATHERED {} {} {}", world.rank, gathered.len(), checksum(&gathered));
    let losses: Vec<f32> =
        (BEFORE..BEFORE + AFTER).map(|k| step(&mut session, &ids, &targets, k)).collect();
    println!("CONTINUED {} {losses:?}", world.rank);
    drop(session);
    job.barrier("done").expect("barrier");
    if let Ok(job) = Arc::try_unwrap(job) {
        job.finish().expect("finish");
    }
}

/// A regular file beside the checkpoint `dir`, which a save must refuse to replace.
fn blocked(dir: &Path) -> PathBuf {
    dir.with_extension("file")
}

/// The text after `marker` on the line of `stdout` that has it.
fn after<'a>(stdout: &'a str, marker: &str) -> &'a str {
    let line = stdout.lines().find_map(|l| l.split_once(marker).map(|(_, rest)| rest));
    line.unwrap_or_else(|| panic!("no line with {marker:?}:\n{stdout}")).trim()
}

fn launch(dir: &Path) -> String {
    let output = common::launch_two(&std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "checkpoint_worker", "--nocapture", "--test-threads", "1"])
        .env(DIR_VARIABLE, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "launch failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn a_job_saves_and_one_device_continues() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("checkpoint");
    std::fs::write(blocked(&dir), b"keep me").unwrap();
    let stdout = launch(&dir);
    for rank in 0..2 {
        let refused = after(&stdout, &format!("REFUSED {rank} "));
        assert!(refused.contains("exists and is not a directory"), "rank {rank}: {refused}");
    }
    assert_eq!(std::fs::read(blocked(&dir)).unwrap(), b"keep me");
    let index = checkpoint::Index::read(&dir.join(checkpoint::INDEX_FILE)).unwrap();
    assert_eq!((index.world_size, index.steps_done), (2, BEFORE as u64));
    for file in &index.files {
        assert!(dir.join(file).is_file(), "{file} is listed but missing");
    }
    assert!(index.tensors.contains_key("rng.step.0"), "the dropout step counter is saved");

    let (mut one, ids, targets) = session(1, SessionConfig::default());
    checkpoint::load(&mut one, &dir, &LoadOptions::default()).unwrap();
    assert_eq!(one.steps_done(), BEFORE as u64);
    let variables = one.variables().unwrap();
    let counter = variables.iter().find(|(name, _)| name == "rng.step.0").unwrap();
    assert_eq!(counter.1.to_vec::<f64>().unwrap(), [BEFORE as f64]);
    for rank in 0..2 {
        let gathered = after(&stdout, &format!("GATHERED {rank} "));
        let (count, sum) = gathered.split_once(' ').unwrap();
        assert_eq!(count.parse::<usize>().unwrap(), variables.len(), "rank {rank}: {gathered}");
        let (sum, expected) = (sum.parse::<f64>().unwrap(), checksum(&variables));
        assert!((sum - expected).abs() < 1e-9 * expected.abs().max(1.0), "{sum} vs {expected}");
    }
    let losses: Vec<f32> =
        (BEFORE..BEFORE + AFTER).map(|k| step(&mut one, &ids, &targets, k)).collect();
    for rank in 0..2 {
        let line = after(&stdout, &format!("CONTINUED {rank} "));
        let values: Vec<f32> = line
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(values.len(), AFTER, "{line}");
        for (k, (a, b)) in values.iter().zip(&losses).enumerate() {
            assert!((a - b).abs() < 2e-4, "rank {rank} step {}: {a} vs {b}", BEFORE + k);
        }
    }
}
