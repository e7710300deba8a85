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
//! [`load`] checks names, shapes and dtypes against the session, then builds every rank's shard
//! in the session's own layout from the stored regions it meets (resharding by region
//! intersection; matching layouts take the stored shard as is). [`export_logical`] and
//! [`load_logical`] write and read one safetensors file of whole logical tensors under the names
//! of `shared/formats/gpt-weights.md`, for PyTorch.

pub mod atomic;
mod error;
mod index;
mod logical;
mod reshard;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use meshflow_ops::io::{self, Named};
use meshflow_ops::Tensor as HostTensor;

use crate::exec::layout::take_box;
use crate::session::shards::{RankShards, VariableSpec};
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
}

/// The name of the file rank `rank` writes.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank}.safetensors")
}

/// Saves the variables and step counter of `session` into the directory `dir`, replacing the
/// checkpoint there atomically; returns the index written.
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
    let initial = initial_values(session, &specs)?;
    let temporary = atomic::temporary_sibling(dir)?;
    let written = write_rank_files(session, &specs, &initial, &temporary, options);
    let result = written.and_then(|files| {
        let index = build_index(session, &specs, files)?;
        atomic::write_synced(&temporary.join(INDEX_FILE), index.to_json().as_bytes())?;
        atomic::publish_directory(&temporary, dir)?;
        Ok(index)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    result
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
    let assignments = built.into_iter().collect::<crate::Result<Vec<_>>>()?;
    session.set_shards(assignments)?;
    if !options.weights_only {
        session.set_steps_done(index.steps_done);
    }
    Ok(())
}

/// The logical values of the variables when a writer rank has not materialised its shard yet
/// (no step has run since the session started): their initial values. Empty otherwise.
fn initial_values(
    session: &Session,
    specs: &Arc<Vec<VariableSpec>>,
) -> Result<Arc<HashMap<String, HostTensor>>> {
    let held = Arc::clone(specs);
    let lacking = session.on_each_rank(move |shards| {
        let rank = shards.rank();
        held.iter().any(|spec| spec.is_writer(rank) && shards.shard(spec).is_none())
    })?;
    if !lacking.contains(&true) {
        return Ok(Arc::default());
    }
    Ok(Arc::new(session.variables()?.into_iter().collect()))
}

/// Every rank writes its file into `dir`; per rank, the file name (`None`: nothing to write).
fn write_rank_files(
    session: &Session,
    specs: &Arc<Vec<VariableSpec>>,
    initial: &Arc<HashMap<String, HostTensor>>,
    dir: &Path,
    options: &SaveOptions,
) -> Result<Vec<Option<String>>> {
    let (specs, initial) = (Arc::clone(specs), Arc::clone(initial));
    let (dir, fail) = (dir.to_path_buf(), options.fail_on_rank);
    let results = session
        .on_each_rank(move |shards| write_rank_file(shards, &specs, &initial, &dir, fail))?;
    results.into_iter().collect()
}

/// Writes the shards this rank is the writer of (see the module doc) into `dir`.
fn write_rank_file(
    shards: &RankShards<'_>,
    specs: &[VariableSpec],
    initial: &HashMap<String, HostTensor>,
    dir: &Path,
    fail: Option<usize>,
) -> Result<Option<String>> {
    let rank = shards.rank();
    let mut named = Named::default();
    for spec in specs.iter().filter(|s| s.is_writer(rank)) {
        let shard = match shards.shard(spec) {
            Some(shard) => shard,
            None => initial_shard(spec, rank, initial)?,
        };
        named.tensors.insert(spec.name.clone(), shard);
    }
    if named.tensors.is_empty() {
        return Ok(None);
    }
    named.metadata.insert("format".into(), format!("{FORMAT}-shard"));
    named.metadata.insert("rank".into(), rank.to_string());
    let file = rank_file(rank);
    let path = dir.join(&file);
    let bytes = io::serialize(&named, &path.display().to_string())?;
    if fail == Some(rank) {
        atomic::write_synced(&path, &bytes[..bytes.len() / 2])?;
        let source = std::io::Error::other("injected failure (SaveOptions::fail_on_rank)");
        return Err(Error::Io { path, source });
    }
    atomic::write_synced(&path, &bytes)?;
    Ok(Some(file))
}

/// This rank's region of the initial value of `spec`.
fn initial_shard(
    spec: &VariableSpec,
    rank: usize,
    initial: &HashMap<String, HostTensor>,
) -> Result<HostTensor> {
    let logical = initial.get(&spec.name).ok_or_else(|| {
        crate::Error::Runtime(format!("variable {} has no value to save", spec.name))
    })?;
    let region = spec.region(rank)?.ok_or_else(|| {
        crate::Error::Runtime(format!("rank {rank} does not hold variable {}", spec.name))
    })?;
    Ok(take_box(logical, &region.offsets, &region.shape)?)
}

/// The index of what the ranks wrote.
fn build_index(
    session: &Session,
    specs: &[VariableSpec],
    files: Vec<Option<String>>,
) -> Result<Index> {
    let mut tensors = BTreeMap::new();
    for spec in specs {
        let mut shards = Vec::new();
        for rank in (0..files.len()).filter(|&r| spec.is_writer(r)) {
            let Some(region) = spec.region(rank)? else { continue };
            let file = files[rank].clone().unwrap_or_else(|| rank_file(rank));
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
        world_size: session.world_size(),
        files: files.into_iter().flatten().collect(),
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
