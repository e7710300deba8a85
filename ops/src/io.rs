//! Safetensors files of named tensors with string metadata (for example the `config` key of a
//! GPT checkpoint). Errors name the file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use crate::{DType, Error, Result, Tensor};

/// The contents of a safetensors file.
#[derive(Clone, Debug, Default)]
pub struct Named {
    /// Tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// The string metadata of the header (`__metadata__`).
    pub metadata: BTreeMap<String, String>,
}

impl Named {
    /// The tensor called `name`, or an error naming it and `source` (the file).
    pub fn tensor(&self, name: &str, source: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Safetensors {
            path: source.to_string(),
            reason: format!("no tensor named {name}"),
        })
    }
}

/// Writes `tensors` and `metadata` to the safetensors file at `path`.
pub fn save(path: impl AsRef<Path>, named: &Named) -> Result<()> {
    let path = path.as_ref();
    let bytes = serialize(named, &path.display().to_string())?;
    std::fs::write(path, bytes)
        .map_err(|source| Error::Io { path: path.display().to_string(), source })
}

/// Reads the safetensors file at `path`.
pub fn load(path: impl AsRef<Path>) -> Result<Named> {
    let path = path.as_ref();
    let bytes = std::fs::read(path)
        .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    deserialize(&bytes, &path.display().to_string())
}

/// The safetensors bytes of `named`; `source` names the destination in errors.
pub fn serialize(named: &Named, source: &str) -> Result<Vec<u8>> {
    let views: Vec<(&str, TensorView<'_>)> = named
        .tensors
        .iter()
        .map(|(name, tensor)| Ok((name.as_str(), TensorView::new(tensor)?)))
        .collect::<Result<_>>()?;
    let metadata: HashMap<String, String> =
        named.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(views, metadata).map_err(|e| file_error(source, e))
}

/// Parses safetensors bytes; `source` names where they came from in errors.
pub fn deserialize(bytes: &[u8], source: &str) -> Result<Named> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| file_error(source, e))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| file_error(source, e))?;
    let mut named = Named::default();
    if let Some(metadata) = header.metadata() {
        named.metadata = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    for (name, view) in file.tensors() {
        let dtype = from_safetensors(view.dtype()).ok_or_else(|| Error::Safetensors {
            path: source.to_string(),
            reason: format!("tensor {name} has unsupported dtype {:?}", view.dtype()),
        })?;
        let tensor = Tensor::from_bytes(view.data(), view.shape(), dtype).map_err(|e| {
            Error::Safetensors { path: source.to_string(), reason: format!("tensor {name}: {e}") }
        })?;
        named.tensors.insert(name, tensor);
    }
    Ok(named)
}

fn file_error(source: &str, error: impl std::fmt::Display) -> Error {
    Error::Safetensors { path: source.to_string(), reason: error.to_string() }
}

fn to_safetensors(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

fn from_safetensors(dtype: Dtype) -> Option<DType> {
    DType::ALL.into_iter().find(|&d| to_safetensors(d) == dtype)
}

/// A host tensor seen by the safetensors writer.
struct TensorView<'a> {
    tensor: &'a Tensor,
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    fn new(tensor: &'a Tensor) -> Result<Self> {
        Ok(TensorView { tensor, bytes: tensor.bytes()? })
    }
}

impl View for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        to_safetensors(self.tensor.dtype())
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
