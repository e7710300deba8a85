//! `index.json`: what a checkpoint holds and where. One entry per tensor name with its logical
//! shape, dtype, the layout it was saved from (placement text and nd-SBP) and the shards: which
//! file holds which region (offsets and shape in the logical tensor). The shards of an entry
//! tile the logical tensor exactly (no gaps, no overlaps); [`Index::parse`] checks that.

use std::collections::BTreeMap;
use std::path::Path;

use meshflow_ops::DType;
use meshflow_placement::{check_layout, NdSbp, Placement, Region, Sbp};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// The value of [`Index::format`].
pub const FORMAT: &str = "meshflow-checkpoint";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// The name of the index file in a checkpoint directory.
pub const INDEX_FILE: &str = "index.json";

/// The contents of `index.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Training steps done when the checkpoint was saved (the optimizer's step counter and the
    /// schedule position).
    pub steps_done: u64,
    /// Devices of the session that saved it.
    pub world_size: usize,
    /// The shard files, in rank order.
    pub files: Vec<String>,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// One tensor of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Element type (`f32`, `bf16` …).
    pub dtype: String,
    /// The placement it was saved from, as text (`cpu:[[0,1],[2,3]]`).
    pub placement: String,
    /// The nd-SBP it was saved from, one SBP per mesh axis (`["B", "S(0)"]`).
    pub nd_sbp: Vec<String>,
    /// True for optimizer state.
    pub optimizer_state: bool,
    /// Where its regions are.
    pub shards: Vec<ShardEntry>,
}

/// One region of a tensor, in one file, under the tensor's own name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The file (a plain name in the checkpoint directory).
    pub file: String,
    /// The rank that wrote it.
    pub rank: usize,
    /// Offset of the region along each axis.
    pub offsets: Vec<usize>,
    /// Shape of the region.
    pub shape: Vec<usize>,
}

impl ShardEntry {
    /// The region this shard covers.
    pub fn region(&self) -> Region {
        Region { offsets: self.offsets.clone(), shape: self.shape.clone() }
    }
}

impl TensorEntry {
    /// The dtype, or an error naming the index and tensor.
    pub fn dtype(&self, path: &Path, name: &str) -> Result<DType> {
        parse_dtype(&self.dtype).ok_or_else(|| Error::Index {
            path: path.to_path_buf(),
            reason: format!("tensor {name}: unknown dtype {:?}", self.dtype),
        })
    }

    /// The placement and nd-SBP it was saved from.
    pub fn layout(&self, path: &Path, name: &str) -> Result<(Placement, NdSbp)> {
        let error = |reason: String| Error::Index {
            path: path.to_path_buf(),
            reason: format!("tensor {name}: {reason}"),
        };
        let placement: Placement = self.placement.parse().map_err(|e| error(format!("{e}")))?;
        let axes = self.nd_sbp.iter().map(|text| {
            parse_sbp(text)
                .ok_or_else(|| error(format!("bad SBP {text:?} (expected S(axis), B or P)")))
        });
        let nd_sbp = NdSbp(axes.collect::<Result<_>>()?);
        check_layout(name, &self.shape, &nd_sbp, &placement).map_err(|e| error(e.to_string()))?;
        Ok((placement, nd_sbp))
    }
}

impl Index {
    /// Reads and checks the index at `path`.
    pub fn read(path: &Path) -> Result<Index> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        Index::parse(&text, path)
    }

    /// Parses and checks an index (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Index> {
        let error = |reason: String| Error::Index { path: path.to_path_buf(), reason };
        let index: Index = serde_json::from_str(text).map_err(|e| error(e.to_string()))?;
        if index.format != FORMAT || index.version != VERSION {
            return Err(error(format!(
                "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                index.format, index.version
            )));
        }
        for (name, entry) in &index.tensors {
            entry.dtype(path, name)?;
            entry.layout(path, name)?;
            check_tiling(entry).map_err(|reason| error(format!("tensor {name}: {reason}")))?;
            if let Some(shard) = entry.shards.iter().find(|s| !is_plain_name(&s.file)) {
                return Err(error(format!(
                    "tensor {name}: file {:?} is not a plain name",
                    shard.file
                )));
            }
        }
        Ok(index)
    }

    /// The JSON text (pretty-printed).
    pub fn to_json(&self) -> String {
        // Invariant: string keys and plain values always serialise.
        serde_json::to_string_pretty(self).expect("an index serialises to JSON")
    }
}

/// The text of one SBP (`S(0)`, `B`, `P`), as the index stores it.
pub fn sbp_text(sbp: Sbp) -> String {
    sbp.to_string()
}

fn parse_sbp(text: &str) -> Option<Sbp> {
    match text.trim() {
        "B" => Some(Sbp::Broadcast),
        "P" => Some(Sbp::PartialSum),
        other => {
            let axis = other.strip_prefix("S(")?.strip_suffix(')')?;
            axis.trim().parse().ok().map(Sbp::Split)
        }
    }
}

fn parse_dtype(text: &str) -> Option<DType> {
    DType::ALL.into_iter().find(|d| d.name() == text)
}

/// A file name without directories (the index may not point outside its directory).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && Path::new(name).file_name().is_some_and(|f| f == name)
}

/// The shards lie inside the tensor, do not overlap, and cover it.
fn check_tiling(entry: &TensorEntry) -> Result<(), String> {
    let rank = entry.shape.len();
    let mut covered = 0usize;
    for (i, shard) in entry.shards.iter().enumerate() {
        let inside = shard.offsets.len() == rank
            && shard.shape.len() == rank
            && (0..rank).all(|a| {
                shard.offsets[a]
                    .checked_add(shard.shape[a])
                    .is_some_and(|end| end <= entry.shape[a])
            });
        if !inside {
            return Err(format!(
                "shard in {} at {:?} of shape {:?} lies outside the tensor's shape {:?}",
                shard.file, shard.offsets, shard.shape, entry.shape
            ));
        }
        let region = shard.region();
        if let Some(other) =
            entry.shards[..i].iter().find(|o| o.region().intersect(&region).is_some())
        {
            return Err(format!(
                "shards in {} at {:?} and in {} at {:?} overlap",
                other.file, other.offsets, shard.file, shard.offsets
            ));
        }
        covered += region.numel();
    }
    let numel: usize = entry.shape.iter().product();
    if covered != numel {
        return Err(format!("the shards cover {covered} of the {numel} elements"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(shards: &[(&[usize], &[usize])]) -> TensorEntry {
        TensorEntry {
            shape: vec![4, 6],
            dtype: "f32".into(),
            placement: "cpu:0-1".into(),
            nd_sbp: vec!["S(0)".into()],
            optimizer_state: false,
            shards: shards
                .iter()
                .map(|(offsets, shape)| ShardEntry {
                    file: "rank-0.safetensors".into(),
                    rank: 0,
                    offsets: offsets.to_vec(),
                    shape: shape.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn tiling_is_checked() {
        assert_eq!(check_tiling(&entry(&[(&[0, 0], &[2, 6]), (&[2, 0], &[2, 6])])), Ok(()));
        let gap = check_tiling(&entry(&[(&[0, 0], &[2, 6])])).unwrap_err();
        assert!(gap.contains("cover 12 of the 24"), "{gap}");
        let overlap = check_tiling(&entry(&[(&[0, 0], &[3, 6]), (&[2, 0], &[2, 6])])).unwrap_err();
        assert!(overlap.contains("overlap"), "{overlap}");
        let outside = check_tiling(&entry(&[(&[0, 0], &[5, 6])])).unwrap_err();
        assert!(outside.contains("outside"), "{outside}");
    }

    #[test]
    fn sbp_and_names_parse() {
        assert_eq!(parse_sbp("S(1)"), Some(Sbp::Split(1)));
        assert_eq!(parse_sbp("B"), Some(Sbp::Broadcast));
        assert_eq!(parse_sbp("P"), Some(Sbp::PartialSum));
        assert_eq!(parse_sbp("S(x)"), None);
        assert_eq!(parse_sbp(&sbp_text(Sbp::Split(3))), Some(Sbp::Split(3)));
        assert!(is_plain_name("rank-0.safetensors"));
        assert!(!is_plain_name("../rank-0.safetensors"));
        assert!(!is_plain_name("/etc/passwd"));
        assert!(!is_plain_name(".."));
    }
}
