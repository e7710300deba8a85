//! Checkpoints: the variables of a session (parameters, optimizer state) and its step counter,
//! saved shard by shard and loaded into any other mesh and layout.
//!
//! A checkpoint is a directory:
//!
//! - `rank-<r>.safetensors`: the shards rank `r` writes, each under its variable's name. Every
//!   rank writes only its own shards, on its own device thread, and of identical copies only one:
//!   a shard is written by the rank at coordinate 0 of every broadcast mesh axis of its layout
//!   (the first rank of its group of copies), so each distinct region is stored exactly once.
//!   A rank that writes nothing has no file.
//! - `index.json` ([`Index`]): per tensor, its logical shape, dtype, the layout it was saved from
//!   (placement text and nd-SBP) and which file holds which region (offsets and shape), plus the
//!   steps done.
//!
//! [`save`] writes into a temporary sibling directory, syncs the files and the directory, and
//! only then renames it over the previous checkpoint (see [`atomic`]): a failure or a crash at
//! any point leaves the previous checkpoint whole and loadable.
//!
//! In a session of several processes (`SessionConfig::job`), [`save`] and [`load`] are
//! collective: every process calls them, writes (or reads) the files of its own ranks, and the
//! directory must be on a file system every process sees. Rank 0 makes the temporary
//! directory, waits until every process has reported its files written (through the job's
//! key-value store, which also carries any failure, so nothing hangs), then writes the index and
//! publishes; every process returns rank 0's outcome.
//!
//! [`load`] checks names, shapes and dtypes against the session, then builds every rank's shard
//! in the session's own layout from the stored regions it meets (resharding by region
//! intersection; matching layouts take the stored shard as is). [`export_logical`] and
//! [`load_logical`] write and read one safetensors file of whole logical tensors under the names
//! of `shared/formats/gpt-weights.md`, for PyTorch.

pub mod atomic;
mod error;
mod index;
mod job;
mod logical;
mod reshard;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use meshflow_ops::io::{self, Named};
use meshflow_ops::{DType, Tensor as HostTensor};

use crate::session::shards::{RankAssignments, RankShards, VariableSpec};
use crate::session::Session;

pub use error::{Error, Result};
pub use index::{sbp_text, Index, ShardEntry, TensorEntry, FORMAT, INDEX_FILE, VERSION};
pub use logical::{export_logical, load_logical, ExportOptions};
use reshard::{rank_shards, Pieces};

/// How a checkpoint is loaded.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Load the parameters only: optimizer state is neither required nor read (the session's
    /// stays as it is), and the step counter is not restored. Default false: everything must
    /// be there.
    pub weights_only: bool,
}

/// How a checkpoint is saved.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Fault injection, for tests of atomicity: this rank writes half of its file and then fails
    /// as a full disk would. `None` (the default) in real use.
    pub fail_on_rank: Option<usize>,
    /// Refuse to save a variable holding a NaN or an infinity (a run that diverged): the save
    /// fails naming the variable, and the checkpoint already in the directory stays as it was,
    /// so a diverged run never replaces the last good one. Off by default: a checkpoint is a
    /// snapshot of whatever the session holds.
    pub finite_only: bool,
}

/// The name of the file rank `rank` writes.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank}.safetensors")
}

/// Checks that a checkpoint can be saved at `dir`: `dir` is absent, empty or a checkpoint
/// ([`save`] replaces the whole directory), the directory above it exists or can be made, and a
/// temporary sibling of `dir` can be created there (and is removed again), as [`save`] needs.
/// A training script calls it before its first step, so that a destination it cannot write
/// fails the run at its start, with the directory named, instead of at the first save. It
/// makes the directory above `dir` if missing and leaves nothing else behind.
pub fn check_destination(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let temporary = prepare(dir)?;
    std::fs::remove_dir(&temporary).map_err(Error::io(&temporary))
}

/// The temporary sibling a save of `dir` writes into, made once `dir` is known to be
/// replaceable ([`check_replaceable`]); an error making it names `dir`, not the sibling.
fn prepare(dir: &Path) -> Result<std::path::PathBuf> {
    check_replaceable(dir)?;
    atomic::temporary_sibling(dir).map_err(|error| match error {
        Error::Io { source, .. } => Error::Io { path: dir.to_path_buf(), source },
        other => other,
    })
}

/// Refuses a destination that is not a checkpoint: a save swaps the whole directory at `dir`
/// for the new one and deletes the old, so `dir` must be absent, an empty directory, or a
/// directory holding only what a save writes ([`INDEX_FILE`] and [`rank_file`]s). Anything else
/// there (a file, a symbolic link, a directory of other files) would be lost.
fn check_replaceable(dir: &Path) -> Result<()> {
    let refused = |reason: String| Error::Refused { path: dir.to_path_buf(), reason };
    let metadata = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(Error::io(dir))?,
    };
    if metadata.is_symlink() {
        return Err(refused("is a symbolic link (give the directory it points to)".into()));
    }
    if !metadata.is_dir() {
        return Err(refused("exists and is not a directory".into()));
    }
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let entry = entry.map_err(Error::io(dir))?;
        let is_file = entry.file_type().map_err(Error::io(entry.path()))?.is_file();
        let name = entry.file_name();
        if !(is_file && is_checkpoint_file(&name.to_string_lossy())) {
            let what = if is_file { "file" } else { "entry" };
            return Err(refused(format!(
                "holds the {what} {name:?}, which is not part of a checkpoint (those are \
                 {INDEX_FILE} and rank-<r>.safetensors)"
            )));
        }
    }
    Ok(())
}

/// True for the names a save writes: the index and rank files.
fn is_checkpoint_file(name: &str) -> bool {
    let rank = name.strip_prefix("rank-").and_then(|rest| rest.strip_suffix(".safetensors"));
    name == INDEX_FILE
        || rank.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
}

/// Saves the variables and step counter of `session` into the directory `dir`, replacing the
/// checkpoint there atomically; returns the index written. `dir` must be absent, an empty
/// directory or a checkpoint: anything else there is refused ([`Error::Refused`]), not replaced.
pub fn save(session: &Session, dir: impl AsRef<Path>) -> Result<Index> {
    save_with(session, dir, &SaveOptions::default())
}

/// [`save`] with options.
pub fn save_with(session: &Session, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<Index> {
    let dir = dir.as_ref();
    let specs = session.variable_specs();
    for spec in &specs {
        spec.check_storable()?;
    }
    let specs = Arc::new(specs);
    if let Some(job) = session.job() {
        return job::save(session, job, &specs, dir, options);
    }
    let temporary = prepare(dir)?;
    let written = write_rank_files(session, &specs, (&temporary, dir), options);
    let result = written.and_then(|()| publish(session, &specs, &temporary, dir));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    result
}

/// Writes the index into `temporary` (where every rank file already is) and renames it over
/// `dir`.
fn publish(
    session: &Session,
    specs: &[VariableSpec],
    temporary: &Path,
    dir: &Path,
) -> Result<Index> {
    let index = build_index(session, specs)?;
    atomic::write_synced(&temporary.join(INDEX_FILE), index.to_json().as_bytes())?;
    atomic::publish_directory(temporary, dir)?;
    Ok(index)
}

/// Loads the checkpoint in `dir` into `session`, resharding every variable into the session's
/// layout. Missing and unexpected tensors, shapes and dtypes that differ, and files that do not
/// hold what the index says are errors naming the file and the tensor; nothing is set then.
pub fn load(session: &mut Session, dir: impl AsRef<Path>, options: &LoadOptions) -> Result<()> {
    let dir = dir.as_ref();
    let index_path = dir.join(INDEX_FILE);
    let index = Index::read(&index_path)?;
    let wanted: Vec<VariableSpec> = session
        .variable_specs()
        .into_iter()
        .filter(|s| !(options.weights_only && s.optimizer_state))
        .collect();
    check_names(&index, &wanted, &index_path, options)?;
    for spec in &wanted {
        check_entry(&index.tensors[&spec.name], spec, &index_path)?;
    }
    let plan = Arc::new(read_pieces(dir, &index, wanted)?);
    let built = session.on_each_rank(move |shards| rank_shards(shards.rank(), &plan))?;
    let mut assignments: Vec<RankAssignments> = vec![Vec::new(); session.world_size()];
    for (&rank, shards) in session.local_ranks().iter().zip(built) {
        assignments[rank] = shards?;
    }
    session.set_shards(assignments)?;
    if !options.weights_only {
        session.set_steps_done(index.steps_done);
    }
    Ok(())
}

/// Every rank of this process writes its file into `dir`, the temporary sibling of the
/// checkpoint `destination` (a rank that writes nothing has none).
fn write_rank_files(
    session: &Session,
    specs: &Arc<Vec<VariableSpec>>,
    (dir, destination): (&Path, &Path),
    options: &SaveOptions,
) -> Result<()> {
    let specs = Arc::clone(specs);
    let paths = (dir.to_path_buf(), destination.to_path_buf());
    let options = options.clone();
    let results = session.on_each_rank(move |shards| {
        write_rank_file(shards, &specs, (&paths.0, &paths.1), &options)
    })?;
    results.into_iter().collect()
}

/// Writes the shards this rank is the writer of (see the module doc) into `dir`.
fn write_rank_file(
    shards: &RankShards<'_>,
    specs: &[VariableSpec],
    (dir, destination): (&Path, &Path),
    options: &SaveOptions,
) -> Result<()> {
    let rank = shards.rank();
    let file = rank_file(rank);
    let path = dir.join(&file);
    let mut named = Named::default();
    for spec in specs.iter().filter(|s| s.is_writer(rank)) {
        let shard = shards.current(spec)?.ok_or_else(|| {
            crate::Error::Runtime(format!("rank {rank} does not hold variable {}", spec.name))
        })?;
        if options.finite_only {
            if let Some((index, value)) = first_non_finite(&shard)? {
                return Err(Error::Tensor {
                    path: destination.to_path_buf(),
                    tensor: spec.name.clone(),
                    reason: format!(
                        "holds {value} (element {index} of rank {rank}'s shard): not saved, \
                         the checkpoint already there is left as it was \
                         (SaveOptions::finite_only)"
                    ),
                });
            }
        }
        named.tensors.insert(spec.name.clone(), shard);
    }
    if named.tensors.is_empty() {
        return Ok(());
    }
    named.metadata.insert("format".into(), format!("{FORMAT}-shard"));
    named.metadata.insert("rank".into(), rank.to_string());
    let bytes = io::serialize(&named, &path.display().to_string())?;
    if options.fail_on_rank == Some(rank) {
        atomic::write_synced(&path, &bytes[..bytes.len() / 2])?;
        let source = std::io::Error::other("injected failure (SaveOptions::fail_on_rank)");
        return Err(Error::Io { path, source });
    }
    atomic::write_synced(&path, &bytes)?;
    Ok(())
}

/// The first element of a float `tensor` that is a NaN or an infinity, with its value; `None`
/// for an all-finite or an integer tensor.
fn first_non_finite(tensor: &HostTensor) -> Result<Option<(usize, f64)>> {
    fn find<T: Copy>(values: &[T], wide: impl Fn(T) -> f64) -> Option<(usize, f64)> {
        values.iter().map(|&v| wide(v)).enumerate().find(|(_, v)| !v.is_finite())
    }
    Ok(match tensor.dtype() {
        DType::F32 => find(tensor.as_slice::<f32>()?, f64::from),
        DType::F64 => find(tensor.as_slice::<f64>()?, |v| v),
        DType::BF16 => find(tensor.as_slice::<half::bf16>()?, f64::from),
        DType::F16 => find(tensor.as_slice::<half::f16>()?, f64::from),
        _ => None,
    })
}

/// The index of what the ranks wrote: rank `r` has a file when it is the writer of a variable
/// (the same rule as [`write_rank_file`], so no rank needs to hear from the others).
fn build_index(session: &Session, specs: &[VariableSpec]) -> Result<Index> {
    let world = session.world_size();
    let mut tensors = BTreeMap::new();
    for spec in specs {
        let mut shards = Vec::new();
        for rank in (0..world).filter(|&r| spec.is_writer(r)) {
            let Some(region) = spec.region(rank)? else { continue };
            let file = rank_file(rank);
            shards.push(ShardEntry { file, rank, offsets: region.offsets, shape: region.shape });
        }
        let entry = TensorEntry {
            shape: spec.meta.shape.dims().to_vec(),
            dtype: spec.meta.dtype.name().to_string(),
            placement: spec.layout.placement.to_string(),
            nd_sbp: spec.layout.nd_sbp.axes().iter().map(|&s| sbp_text(s)).collect(),
            optimizer_state: spec.optimizer_state,
            shards,
        };
        tensors.insert(spec.name.clone(), entry);
    }
    Ok(Index {
        format: FORMAT.to_string(),
        version: VERSION,
        steps_done: session.steps_done(),
        world_size: world,
        files: (0..world)
            .filter(|&r| specs.iter().any(|s| s.is_writer(r)))
            .map(rank_file)
            .collect(),
        tensors,
    })
}

/// Every wanted variable is in the index, and every tensor of the index is wanted (optimizer
/// state the session has, or that is not wanted, is ignored when loading weights only).
fn check_names(
    index: &Index,
    wanted: &[VariableSpec],
    path: &Path,
    options: &LoadOptions,
) -> Result<()> {
    let missing: Vec<String> = wanted
        .iter()
        .filter(|s| !index.tensors.contains_key(&s.name))
        .map(|s| s.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Missing { path: path.to_path_buf(), names: missing });
    }
    let names: BTreeSet<&str> = wanted.iter().map(|s| s.name.as_str()).collect();
    let unexpected: Vec<String> = index
        .tensors
        .iter()
        .filter(|(name, entry)| {
            let ignored = options.weights_only && entry.optimizer_state;
            !(names.contains(name.as_str()) || ignored)
        })
        .map(|(name, _)| name.clone())
        .collect();
    if !unexpected.is_empty() {
        return Err(Error::Unexpected { path: path.to_path_buf(), names: unexpected });
    }
    Ok(())
}

/// The index's entry has the variable's shape and dtype.
fn check_entry(entry: &TensorEntry, spec: &VariableSpec, path: &Path) -> Result<()> {
    let dtype = entry.dtype(path, &spec.name)?;
    let dims = spec.meta.shape.dims();
    if entry.shape != dims || dtype != spec.meta.dtype {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            tensor: spec.name.clone(),
            reason: format!(
                "the checkpoint holds {:?} {}, the session expects {:?} {}",
                entry.shape, entry.dtype, dims, spec.meta.dtype
            ),
        });
    }
    Ok(())
}

/// Reads the shard files the wanted variables need (each once) and pairs every stored region
/// with its value, checking that each file holds what the index says.
fn read_pieces(dir: &Path, index: &Index, wanted: Vec<VariableSpec>) -> Result<Vec<Pieces>> {
    let mut files: HashMap<String, Named> = HashMap::new();
    for spec in &wanted {
        for shard in &index.tensors[&spec.name].shards {
            if !files.contains_key(&shard.file) {
                files.insert(shard.file.clone(), io::load(dir.join(&shard.file))?);
            }
        }
    }
    wanted
        .into_iter()
        .map(|spec| {
            let entry = &index.tensors[&spec.name];
            let stored = entry
                .shards
                .iter()
                .map(|shard| {
                    let tensor = stored_tensor(&files[&shard.file], shard, &spec, dir)?;
                    Ok((shard.region(), tensor))
                })
                .collect::<Result<_>>()?;
            Ok(Pieces { spec, stored })
        })
        .collect()
}

/// The tensor a shard file holds for `shard` of `spec`, checked against the index.
fn stored_tensor(
    file: &Named,
    shard: &ShardEntry,
    spec: &VariableSpec,
    dir: &Path,
) -> Result<meshflow_ops::Tensor> {
    let error = |reason: String| Error::Tensor {
        path: dir.join(&shard.file),
        tensor: spec.name.clone(),
        reason,
    };
    let tensor = file.tensors.get(&spec.name).ok_or_else(|| {
        error(format!("the index places a region at {:?} here, the file has none", shard.offsets))
    })?;
    if tensor.dims() != shard.shape.as_slice() || tensor.dtype() != spec.meta.dtype {
        return Err(error(format!(
            "the file holds {:?} {}, the index says {:?} {}",
            tensor.dims(),
            tensor.dtype(),
            shard.shape,
            spec.meta.dtype
        )));
    }
    Ok(tensor.clone())
}
