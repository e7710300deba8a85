//! Checkpoints of the GPT of `meshflow::nn`: saved on DP2×TP2, loaded on TP4 and on one device,
//! training continues with the losses of the run that never stopped; a failure during a save
//! leaves the previous checkpoint whole; bad checkpoints are refused with errors naming the
//! file, the tensor and the mismatch; weights move through one logical safetensors file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshflow::checkpoint::{self, Error, ExportOptions, Index, LoadOptions, SaveOptions};
use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, Placement};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::{Graph, Tensor};

mod common;
use common::{token_batch, PATTERN};

const CONFIG: GptConfig = GptConfig { vocab: 16, ctx: 8, n_layer: 2, n_head: 4, d_model: 16 };
const BATCH: usize = 4;
const STEPS: usize = 6;

/// A GPT session on one mesh and its inputs.
struct Trainer {
    session: Session,
    ids: Tensor,
    targets: Tensor,
}

/// A session on a `hierarchy` mesh; training (AdamW, warmup + cosine, so that the step counter
/// matters) unless `training` is false; `seed` of the initial weights.
fn trainer(
    hierarchy: &[usize],
    data_axis: Option<usize>,
    tensor_axis: Option<usize>,
    config: GptConfig,
    training: bool,
    seed: u64,
) -> Trainer {
    let placement = Placement::grid(DeviceType::Cpu, hierarchy).unwrap();
    let layouts = Layouts { placement: placement.clone(), data_axis, tensor_axis };
    let g = Graph::new();
    let t = config.ctx;
    let batch = Some(layouts.batch());
    let ids = g.input("ids", [BATCH, t], DType::I64, &placement, batch.clone()).unwrap();
    let targets = g.input("targets", [BATCH, t], DType::I64, &placement, batch).unwrap();
    let model = Gpt::new(&g, config, &layouts, WeightInit { std: 0.02, seed }).unwrap();
    let loss = model.loss(&ids, &targets).unwrap();
    let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(1e-2) });
    let schedule = Schedule::WarmupCosine { warmup: 2, total: STEPS, min_ratio: 0.1 };
    let training = training.then(|| Training::new(&loss, optimizer, schedule));
    let config = SessionConfig { devices: hierarchy.iter().product(), ..SessionConfig::default() };
    let session = Session::new(&g, &[&loss], training, config).unwrap();
    Trainer { session, ids, targets }
}

impl Trainer {
    /// Runs the step with the batch of position `step`; returns the loss.
    fn step(&mut self, step: usize) -> f32 {
        let (x, y) = token_batch(BATCH, CONFIG.ctx, CONFIG.vocab, step, PATTERN);
        let feeds = [(&self.ids, x), (&self.targets, y)];
        self.session.step(&feeds).unwrap()[0].to_vec::<f32>().unwrap()[0]
    }

    fn steps(&mut self, range: std::ops::Range<usize>) -> Vec<f32> {
        range.map(|s| self.step(s)).collect()
    }
}

fn dp2_tp2() -> Trainer {
    trainer(&[2, 2], Some(0), Some(1), CONFIG, true, 7)
}

/// The losses of two runs agree within 2e-4 at every step.
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    common::assert_close(a, b, 2e-4, what);
}

/// Every variable of both sessions is equal, element by element.
fn assert_same_variables(a: &Session, b: &Session) {
    let (a, b) = (a.variables().unwrap(), b.variables().unwrap());
    assert_eq!(a.len(), b.len());
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        assert_eq!(x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap(), "{name}");
    }
}

#[test]
fn resharding_continues_training_on_tp4_and_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt");
    let mut reference = dp2_tp2();
    let first = reference.steps(0..3);
    let index = checkpoint::save(&reference.session, &path).unwrap();
    let rest = reference.steps(3..STEPS);
    assert!(rest[2] < first[0], "the loss did not fall: {first:?} {rest:?}");

    // Broadcast copies are written once, by the first rank of their group: every weight is
    // B on the data axis, so ranks 2 and 3 write nothing; a TP-split weight has one shard per
    // tensor-parallel rank, a replicated one a single shard.
    assert_eq!(index.steps_done, 3);
    assert_eq!(index.files, ["rank-0.safetensors", "rank-1.safetensors"]);
    let c_fc = &index.tensors["h.0.mlp.c_fc.weight"];
    assert_eq!(c_fc.nd_sbp, ["B", "S(0)"]);
    let shards: Vec<_> = c_fc.shards.iter().map(|s| (s.rank, s.offsets.clone())).collect();
    assert_eq!(shards, [(0, vec![0, 0]), (1, vec![32, 0])]);
    assert_eq!(index.tensors["wte.weight.exp_avg"].shards.len(), 1);
    assert!(index.tensors["wte.weight.exp_avg"].optimizer_state);
    let on_disk = Index::read(&path.join("index.json")).unwrap();
    assert_eq!(on_disk, index);

    for (name, mut resumed) in [
        ("tp4", trainer(&[4], None, Some(0), CONFIG, true, 99)),
        ("1 device", trainer(&[1], None, None, CONFIG, true, 99)),
    ] {
        checkpoint::load(&mut resumed.session, &path, &LoadOptions::default()).unwrap();
        assert_eq!(resumed.session.steps_done(), 3, "{name}");
        assert_close(&resumed.steps(3..STEPS), &rest, name);
    }
}

/// A DP2×TP2 run of one step saved with `options` into `ckpt` of a new temporary directory.
fn saved_after_one_step(options: &SaveOptions) -> (tempfile::TempDir, PathBuf, Trainer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt");
    let mut run = dp2_tp2();
    run.step(0);
    checkpoint::save_with(&run.session, &path, options).unwrap();
    (dir, path, run)
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_whole() {
    let (dir, path, mut run) = saved_after_one_step(&SaveOptions::default());
    let mut saved = trainer(&[1], None, None, CONFIG, true, 99);
    checkpoint::load(&mut saved.session, &path, &LoadOptions::default()).unwrap();
    run.step(1);

    let options = SaveOptions { fail_on_rank: Some(1), ..SaveOptions::default() };
    let error = checkpoint::save_with(&run.session, &path, &options).unwrap_err();
    assert!(error.to_string().contains("injected failure"), "{error}");
    assert_eq!(Index::read(&path.join("index.json")).unwrap().steps_done, 1);
    let mut again = trainer(&[1], None, None, CONFIG, true, 99);
    checkpoint::load(&mut again.session, &path, &LoadOptions::default()).unwrap();
    assert_same_variables(&saved.session, &again.session);
    assert_eq!(stale_siblings(dir.path()), 0, "a failed save cleans up after itself");

    // A save killed midway leaves a temporary sibling: loading ignores it, the next save
    // removes it and replaces the checkpoint.
    let stale = dir.path().join(".ckpt.tmp-1-1");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("rank-0.safetensors"), b"half a file").unwrap();
    checkpoint::load(&mut again.session, &path, &LoadOptions::default()).unwrap();
    checkpoint::save(&run.session, &path).unwrap();
    assert_eq!(stale_siblings(dir.path()), 0);
    assert_eq!(Index::read(&path.join("index.json")).unwrap().steps_done, 2);
}

/// With `finite_only`, a session holding a NaN (a run that diverged) is not saved over the last
/// good checkpoint; the error names the variable and the value. By default it is saved.
#[test]
fn a_diverged_run_is_not_saved_over_a_good_checkpoint() {
    let finite_only = SaveOptions { finite_only: true, ..SaveOptions::default() };
    let (dir, path, mut run) = saved_after_one_step(&finite_only);
    run.step(1);
    let name = "h.1.mlp.c_fc.weight";
    let variables = run.session.variables().unwrap();
    let (_, weight) = variables.iter().find(|(n, _)| n == name).unwrap();
    let mut values = weight.to_vec::<f32>().unwrap();
    let last = values.len() - 1;
    values[last] = f32::NAN;
    let poisoned = HostTensor::from_vec(values, weight.dims().to_vec()).unwrap();
    run.session.load_variables(&[(name.to_string(), poisoned)]).unwrap();

    let error = checkpoint::save_with(&run.session, &path, &finite_only).unwrap_err().to_string();
    assert!(error.contains(name) && error.contains("holds NaN"), "{error}");
    assert!(error.contains("left as it was"), "{error}");
    assert!(error.starts_with(&format!("checkpoint {}: tensor {name}", path.display())), "{error}");
    assert_eq!(Index::read(&path.join("index.json")).unwrap().steps_done, 1, "the good one stays");
    assert_eq!(stale_siblings(dir.path()), 0, "the refused save cleans up after itself");
    let mut resumed = trainer(&[1], None, None, CONFIG, true, 99);
    checkpoint::load(&mut resumed.session, &path, &LoadOptions::default()).unwrap();
    assert!(resumed
        .session
        .variables()
        .unwrap()
        .iter()
        .all(|(_, t)| { t.to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()) }));

    checkpoint::save(&run.session, &path).unwrap();
    assert_eq!(Index::read(&path.join("index.json")).unwrap().steps_done, 2, "saved by default");
}

#[test]
fn a_destination_that_cannot_be_written_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint directory inside a new directory: made, and nothing else is left.
    let nested = dir.path().join("runs").join("ckpt");
    checkpoint::check_destination(&nested).unwrap();
    assert!(dir.path().join("runs").is_dir());
    assert!(!nested.exists(), "the check saves nothing");
    assert_eq!(stale_siblings(&dir.path().join("runs")), 0);
    // Under a regular file no directory can be made (as root too): the error names the
    // destination, not the temporary sibling it tried.
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let blocked = file.join("ckpt");
    let error = checkpoint::check_destination(&blocked).unwrap_err();
    assert!(matches!(&error, Error::Io { path, .. } if path == &blocked), "{error}");
    assert!(error.to_string().contains(&*blocked.to_string_lossy()), "{error}");
}

#[test]
fn a_save_replaces_only_a_checkpoint_or_an_empty_directory() {
    let (dir, path, run) = saved_after_one_step(&SaveOptions::default());
    // Over a checkpoint and into an empty directory: saved.
    checkpoint::save(&run.session, &path).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    checkpoint::save(&run.session, &empty).unwrap();
    assert_eq!(Index::read(&empty.join("index.json")).unwrap().steps_done, 1);

    // A regular file, a directory of other files and a symbolic link are refused by the early
    // check and by the save, named, and left exactly as they were (a save used to swap any of
    // them for the checkpoint and delete the old one).
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("index.json"), b"{}").unwrap();
    std::fs::write(project.join("train.rs"), b"fn main() {}").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    for (target, says) in [
        (&file, "exists and is not a directory"),
        (&project, "holds the file \"train.rs\""),
        (&link, "is a symbolic link"),
    ] {
        for error in [
            checkpoint::check_destination(target).unwrap_err(),
            checkpoint::save(&run.session, target).unwrap_err(),
        ] {
            assert!(matches!(&error, Error::Refused { path, .. } if path == target), "{error}");
            let text = error.to_string();
            assert!(text.contains(says) && text.contains(&*target.to_string_lossy()), "{text}");
        }
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(std::fs::read(project.join("train.rs")).unwrap(), b"fn main() {}");
    assert_eq!(std::fs::read_link(&link).unwrap(), path);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ckpt", "empty", "link", "notes.txt", "project"], "nothing left beside");
}

fn stale_siblings(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".ckpt"))
        .count()
}

#[test]
fn bad_checkpoints_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt");
    let mut run = dp2_tp2();
    run.step(0);
    checkpoint::save(&run.session, &path).unwrap();
    let defaults = LoadOptions::default();

    // A model of another shape.
    let wider = GptConfig { vocab: 20, ..CONFIG };
    let mut other = trainer(&[1], None, None, wider, true, 1);
    let error = checkpoint::load(&mut other.session, &path, &defaults).unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, Error::Tensor { tensor, .. } if tensor == "lm_head.weight" || tensor == "wte.weight"),
        "{text}"
    );
    assert!(text.contains("[16, 16]") && text.contains("[20, 16]"), "{text}");

    // Weights without optimizer state: missing for a training session unless weights only;
    // a training checkpoint's optimizer state is unexpected in an inference session.
    let weights = dir.path().join("weights");
    let inference = trainer(&[2], None, Some(0), CONFIG, false, 7);
    checkpoint::save(&inference.session, &weights).unwrap();
    let mut single = trainer(&[1], None, None, CONFIG, true, 1);
    let error = checkpoint::load(&mut single.session, &weights, &defaults).unwrap_err();
    let Error::Missing { names, .. } = &error else { panic!("{error}") };
    assert!(names.contains(&"wte.weight.exp_avg".to_string()), "{error}");
    assert!(!names.contains(&"wte.weight".to_string()), "{error}");
    let weights_only = LoadOptions { weights_only: true };
    checkpoint::load(&mut single.session, &weights, &weights_only).unwrap();
    let mut inference = trainer(&[1], None, None, CONFIG, false, 1);
    let error = checkpoint::load(&mut inference.session, &path, &defaults).unwrap_err();
    let Error::Unexpected { names, .. } = &error else { panic!("{error}") };
    assert!(names.contains(&"h.1.mlp.c_fc.bias.exp_avg_sq".to_string()), "{error}");
    checkpoint::load(&mut inference.session, &path, &weights_only).unwrap();

    // A corrupted index, then a missing shard file.
    let index = path.join("index.json");
    let good = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, &good[..good.len() / 2]).unwrap();
    let error = checkpoint::load(&mut single.session, &path, &defaults).unwrap_err();
    assert!(matches!(error, Error::Index { .. }), "{error}");
    assert!(error.to_string().contains("index.json"), "{error}");
    std::fs::write(&index, good.replace("\"S(0)\"", "\"S(9)\"")).unwrap();
    let error = checkpoint::load(&mut single.session, &path, &defaults).unwrap_err();
    assert!(error.to_string().contains("S(9)") || error.to_string().contains("axis"), "{error}");
    std::fs::write(&index, &good).unwrap();
    std::fs::remove_file(path.join("rank-1.safetensors")).unwrap();
    let error = checkpoint::load(&mut single.session, &path, &defaults).unwrap_err();
    assert!(error.to_string().contains("rank-1.safetensors"), "{error}");
}

#[test]
fn weights_move_through_one_logical_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpt.safetensors");
    let mut run = dp2_tp2();
    run.step(0);
    let metadata = BTreeMap::from([("config".to_string(), CONFIG.to_json())]);
    let options = ExportOptions { metadata: metadata.clone(), optimizer_state: false };
    checkpoint::export_logical(&run.session, &file, &options).unwrap();
    let named = meshflow::ops::io::load(&file).unwrap();
    assert_eq!(named.tensors["h.0.attn.c_attn.weight"].dims(), &[48, 16]);
    assert!(!named.tensors.contains_key("wte.weight.exp_avg"));
    assert_eq!(named.tensors.len(), 4 + 12 * CONFIG.n_layer + 1);

    let mut single = trainer(&[1], None, None, CONFIG, false, 1);
    let loaded = checkpoint::load_logical(&mut single.session, &file, &LoadOptions::default());
    assert_eq!(loaded.unwrap(), metadata);
    let weights: Vec<_> = run
        .session
        .variables()
        .unwrap()
        .into_iter()
        .filter(|(name, _)| !name.contains(".exp_avg"))
        .collect();
    let single = single.session.variables().unwrap();
    assert_eq!(weights.len(), single.len());
    for ((name, x), (other, y)) in weights.iter().zip(&single) {
        assert_eq!(name, other);
        assert_eq!(x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap(), "{name}");
    }

    let mut training = trainer(&[1], None, None, CONFIG, true, 1);
    let error = checkpoint::load_logical(&mut training.session, &file, &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(error, Error::Missing { .. }), "{error}");
    let weights_only = LoadOptions { weights_only: true };
    checkpoint::load_logical(&mut training.session, &file, &weights_only).unwrap();
}
