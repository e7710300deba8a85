//! One safetensors file of whole logical tensors, under the variables' names (for a GPT, the
//! names of `shared/formats/gpt-weights.md`): the way weights move to and from PyTorch.

use std::collections::BTreeMap;
use std::path::Path;

use meshflow_ops::io::{self, Named};
use meshflow_ops::Tensor as HostTensor;

use super::error::{Error, Result};
use super::{atomic, LoadOptions};
use crate::session::shards::VariableSpec;
use crate::session::Session;

/// What [`export_logical`] writes besides the parameters.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// The string metadata of the file (for a GPT, `config`: its JSON, see
    /// `GptConfig::to_json`).
    pub metadata: BTreeMap<String, String>,
    /// Also write the optimizer state (`<parameter>.exp_avg` …). Default false.
    pub optimizer_state: bool,
}

/// Writes the logical value of every parameter of `session` (assembled from its shards) to the
/// safetensors file at `path`, atomically.
pub fn export_logical(
    session: &Session,
    path: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<()> {
    let path = path.as_ref();
    let specs = session.variable_specs();
    let keep = |name: &str| {
        specs.iter().any(|s| s.name == name && (options.optimizer_state || !s.optimizer_state))
    };
    let tensors = session.gather_variables()?.into_iter().filter(|(name, _)| keep(name)).collect();
    let named = Named { tensors, metadata: options.metadata.clone() };
    let bytes = io::serialize(&named, &path.display().to_string())?;
    atomic::replace_file(path, &bytes)
}

/// Loads a file of logical tensors by name into `session` (each rank takes its shard). Float
/// tensors are converted to the variable's dtype. Tensors under the `data.` prefix (token data)
/// are ignored, and so is optimizer state when `options.weights_only`; any other name the
/// session lacks is an error, as is a variable the file lacks. Returns the file's metadata.
pub fn load_logical(
    session: &mut Session,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<BTreeMap<String, String>> {
    let path = path.as_ref();
    let mut file = io::load(path)?;
    let specs = session.variable_specs();
    let wanted: Vec<&VariableSpec> =
        specs.iter().filter(|s| !(options.weights_only && s.optimizer_state)).collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|s| !file.tensors.contains_key(&s.name))
        .map(|s| s.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Missing { path: path.to_path_buf(), names: missing });
    }
    let unexpected: Vec<String> = file
        .tensors
        .keys()
        .filter(|name| !name.starts_with("data.") && !wanted.iter().any(|s| &s.name == *name))
        .filter(|name| !(options.weights_only && is_optimizer_state(name)))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        return Err(Error::Unexpected { path: path.to_path_buf(), names: unexpected });
    }
    let values = wanted
        .iter()
        .map(|spec| {
            let tensor = file.tensors.remove(&spec.name).ok_or_else(|| Error::Missing {
                path: path.to_path_buf(),
                names: vec![spec.name.clone()],
            })?;
            Ok((spec.name.clone(), converted(tensor, spec, path)?))
        })
        .collect::<Result<Vec<_>>>()?;
    session.load_variables(&values)?;
    Ok(file.metadata)
}

fn is_optimizer_state(name: &str) -> bool {
    use crate::session::shards::OPTIMIZER_STATE_SUFFIXES;
    name.rsplit_once('.').is_some_and(|(_, suffix)| OPTIMIZER_STATE_SUFFIXES.contains(&suffix))
}

/// `tensor` in the variable's dtype (floats convert), or an error naming file and tensor.
fn converted(tensor: HostTensor, spec: &VariableSpec, path: &Path) -> Result<HostTensor> {
    let error = |reason: String| Error::Tensor {
        path: path.to_path_buf(),
        tensor: spec.name.clone(),
        reason,
    };
    let (dtype, dims) = (spec.meta.dtype, spec.meta.shape.dims());
    let convertible = tensor.dtype() == dtype || (tensor.dtype().is_float() && dtype.is_float());
    if tensor.dims() != dims || !convertible {
        return Err(error(format!(
            "the file holds {:?} {}, the session expects {:?} {dtype}",
            tensor.dims(),
            tensor.dtype(),
            dims
        )));
    }
    if tensor.dtype() == dtype {
        return Ok(tensor);
    }
    tensor.to_dtype(dtype).map_err(|e| error(e.to_string()))
}
