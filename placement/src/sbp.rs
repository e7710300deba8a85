//! SBP: how one logical tensor lives on one mesh axis.

use std::fmt;

use crate::{Error, Result};

/// The layout of a logical tensor along one mesh axis.
///
/// With `p` devices on the axis:
/// - `Split(a)`: device `i` holds the `i`-th balanced slice along tensor axis `a`
///   (the first `len % p` devices get one more element);
/// - `Broadcast`: every device holds the whole tensor;
/// - `PartialSum`: every device holds a tensor of the full shape; the logical tensor is their sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sbp {
    /// Split along the given tensor axis.
    Split(usize),
    /// A full copy on every device.
    Broadcast,
    /// Full-shape addends whose sum is the logical tensor.
    PartialSum,
}

impl Sbp {
    /// The split axis, if this is a split.
    pub fn split_axis(self) -> Option<usize> {
        match self {
            Sbp::Split(axis) => Some(axis),
            _ => None,
        }
    }
}

impl fmt::Display for Sbp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sbp::Split(axis) => write!(f, "S({axis})"),
            Sbp::Broadcast => f.write_str("B"),
            Sbp::PartialSum => f.write_str("P"),
        }
    }
}

/// One [`Sbp`] per mesh axis: `(S(0), B)` on a `[2, 2]` mesh splits axis 0 across the outer mesh
/// axis and replicates across the inner one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NdSbp(pub Vec<Sbp>);

impl NdSbp {
    /// The same SBP on each of `mesh_axes` axes.
    pub fn uniform(sbp: Sbp, mesh_axes: usize) -> Self {
        NdSbp(vec![sbp; mesh_axes])
    }

    /// All-Broadcast over `mesh_axes` axes.
    pub fn broadcast(mesh_axes: usize) -> Self {
        Self::uniform(Sbp::Broadcast, mesh_axes)
    }

    /// The SBPs, one per mesh axis.
    pub fn axes(&self) -> &[Sbp] {
        &self.0
    }

    /// Number of mesh axes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when it describes no mesh axis.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when some mesh axis holds a partial sum.
    pub fn has_partial(&self) -> bool {
        self.0.contains(&Sbp::PartialSum)
    }

    /// The same layout with every PartialSum replaced by Broadcast.
    pub fn without_partial(&self) -> NdSbp {
        let axes = self.0.iter().map(|&sbp| match sbp {
            Sbp::PartialSum => Sbp::Broadcast,
            other => other,
        });
        NdSbp(axes.collect())
    }

    /// Checks that every split axis is below `logical.len()`; `context` names the op or edge.
    pub fn check_rank(&self, context: &str, logical: &[usize]) -> Result<()> {
        match self.0.iter().find_map(|sbp| sbp.split_axis().filter(|&a| a >= logical.len())) {
            Some(axis) => Err(Error::SplitAxisOutOfRange {
                context: context.to_string(),
                axis,
                shape: logical.to_vec(),
                nd_sbp: self.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl From<Sbp> for NdSbp {
    fn from(sbp: Sbp) -> Self {
        NdSbp(vec![sbp])
    }
}

impl fmt::Display for NdSbp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, sbp) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{sbp}")?;
        }
        f.write_str(")")
    }
}
