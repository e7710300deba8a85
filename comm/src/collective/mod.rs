//! Collectives on any group of ranks.
//!
//! A [`Communicator`] is one member's handle on a group. Every member calls the same collectives
//! in the same order; each call carries a sequence number, and a member that meets a different
//! collective or sequence number from a peer returns [`crate::Error::SequenceMismatch`] naming the
//! collective, the peer and both numbers.
//!
//! Layout conventions (the SBP boxing steps they implement):
//!
//! | collective | input on member `i` | output on member `i` | boxing |
//! | --- | --- | --- | --- |
//! | `all_reduce` | full tensor | reduction of all inputs | P → B |
//! | `reduce_scatter` | full tensor | rows `chunk(dim0, n, i)` of the reduction | P → S(0) |
//! | `all_gather` | any rows, same trailing dims | inputs concatenated along dim 0 in member order | S(0) → B |
//! | `all_to_all` | rows, split in `n` balanced chunks; chunk `j` goes to member `j` | chunks from every member, concatenated in member order | S(i) → S(j) |
//! | `broadcast` | root's tensor | root's tensor | |
//! | `reduce` | full tensor | the reduction at the root only | P → B on one device |
//!
//! Uneven sizes use the balanced split of [`crate::chunk`]: the first `dim0 % n` members hold one
//! row more. Two implementations:
//! - [`SharedGroup`]: device threads of one process cooperate on shared buffers (each reduces or
//!   copies its own chunk, synchronised by a barrier with a timeout; results are shared, not copied).
//! - [`TransportCommunicator`]: any [`crate::Transport`] (in-process or QUIC): ring reduce-scatter
//!   + all-gather for large all-reduces, a direct exchange for small ones.
//!
//! A 2-D mesh runs collectives per mesh axis: [`mesh_axis_group`] gives the ranks of one axis, and
//! a communicator over them is that axis' group.

mod ring;
mod shared;
mod step;

use meshflow_ops::{CpuStorage, Shape, Storage, Tensor, TensorMeta};

pub use ring::TransportCommunicator;
pub use shared::{SharedCommunicator, SharedGroup};

use crate::{Error, Rank, ReduceOp, Result};

/// One member's handle on a group; see the module documentation for the layouts.
pub trait Communicator: Send {
    /// This member's index in the group (0-based, in the order the group lists its ranks).
    fn group_index(&self) -> usize;
    /// Number of members.
    fn group_size(&self) -> usize;
    /// Every member receives the reduction of all inputs.
    fn all_reduce(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor>;
    /// Member `i` receives rows `chunk(dim0, n, i)` of the reduction.
    fn reduce_scatter(&mut self, tensor: &Tensor, operation: ReduceOp) -> Result<Tensor>;
    /// Every member receives all inputs concatenated along dim 0.
    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor>;
    /// Member `i` receives chunk `i` of every input, concatenated along dim 0.
    fn all_to_all(&mut self, tensor: &Tensor) -> Result<Tensor>;
    /// Every member receives the root's tensor; only the root passes one.
    fn broadcast(&mut self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor>;
    /// The root receives the reduction of all inputs; the others receive `None`.
    fn reduce(
        &mut self,
        tensor: &Tensor,
        operation: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>>;
    /// Sends a tensor to one member (point to point, ordered per pair).
    fn send(&mut self, tensor: &Tensor, to: usize) -> Result<()>;
    /// Receives the next tensor member `from` sent to this one.
    fn recv(&mut self, from: usize) -> Result<Tensor>;
}

/// The ranks of the mesh axis `axis` through `rank`, for a row-major mesh of shape `hierarchy`
/// over ranks `0..product(hierarchy)`: the ranks that share every coordinate but `axis`.
pub fn mesh_axis_group(hierarchy: &[usize], rank: Rank, axis: usize) -> Result<Vec<Rank>> {
    let total: usize = hierarchy.iter().product();
    if axis >= hierarchy.len() || rank.0 >= total {
        return Err(Error::InvalidArgument {
            collective: "mesh_axis_group",
            reason: format!("axis {axis} or rank {rank} outside mesh {hierarchy:?}"),
        });
    }
    let stride: usize = hierarchy[axis + 1..].iter().product();
    let coordinate = (rank.0 / stride) % hierarchy[axis];
    let base = rank.0 - coordinate * stride;
    Ok((0..hierarchy[axis]).map(|index| Rank(base + index * stride)).collect())
}

/// Dim 0 and the elements of one row; fails on scalars.
fn rows(collective: &'static str, tensor: &Tensor) -> Result<(usize, usize)> {
    let dims = tensor.dims();
    let Some((&first, rest)) = dims.split_first() else {
        return Err(Error::InvalidArgument {
            collective,
            reason: "a scalar has no rows to split".into(),
        });
    };
    Ok((first, rest.iter().product()))
}

/// A copy of the elements `range` of a tensor's flat storage, with shape `shape`.
fn slice_elements(tensor: &Tensor, range: std::ops::Range<usize>, shape: Shape) -> Result<Tensor> {
    let size = tensor.dtype().size();
    let bytes = &tensor.bytes()?[range.start * size..range.end * size];
    Ok(Tensor::from_bytes(bytes, shape, tensor.dtype())?)
}

/// Rows `range` of a tensor (a copy).
fn slice_rows(
    collective: &'static str,
    tensor: &Tensor,
    range: std::ops::Range<usize>,
) -> Result<Tensor> {
    let (_, row) = rows(collective, tensor)?;
    let mut dims = tensor.dims().to_vec();
    dims[0] = range.len();
    slice_elements(tensor, range.start * row..range.end * row, Shape::new(dims))
}

/// Concatenates tensors along dim 0; all must share the dtype and trailing dims of `like`.
fn concat_rows(
    collective: &'static str,
    like: &Tensor,
    parts: &[(Rank, Tensor)],
) -> Result<Tensor> {
    let trailing = &like.dims()[1..];
    let mut total_rows = 0;
    for (peer, part) in parts {
        if part.dtype() != like.dtype() || part.dims().get(1..) != Some(trailing) {
            return Err(mismatch(
                collective,
                *peer,
                like.dtype(),
                &format!("[_, {trailing:?}]"),
                part,
            ));
        }
        total_rows += part.dims()[0];
    }
    let mut dims = like.dims().to_vec();
    dims[0] = total_rows;
    let meta = TensorMeta::new(dims, like.dtype());
    let mut storage = CpuStorage::zeroed(meta.bytes());
    let mut offset = 0;
    for (_, part) in parts {
        let bytes = part.bytes()?;
        storage.bytes_mut()[offset..offset + bytes.len()].copy_from_slice(bytes);
        offset += bytes.len();
    }
    Ok(Tensor::from_storage(meta, std::sync::Arc::new(Storage::Cpu(storage)))?)
}

fn mismatch(
    collective: &'static str,
    peer: Rank,
    dtype: meshflow_ops::DType,
    shape: &str,
    got: &Tensor,
) -> Error {
    Error::SizeMismatch {
        collective,
        peer,
        expected: format!("{dtype} {shape}"),
        received: format!("{} {:?}", got.dtype(), got.dims()),
    }
}

fn check_root(collective: &'static str, root: usize, size: usize) -> Result<()> {
    if root >= size {
        return Err(Error::InvalidArgument {
            collective,
            reason: format!("root {root} outside a group of {size}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_axes_of_a_two_by_three_mesh() {
        let rows = mesh_axis_group(&[2, 3], Rank(4), 1).expect("axis 1");
        assert_eq!(rows, vec![Rank(3), Rank(4), Rank(5)]);
        let columns = mesh_axis_group(&[2, 3], Rank(4), 0).expect("axis 0");
        assert_eq!(columns, vec![Rank(1), Rank(4)]);
        assert!(mesh_axis_group(&[2, 3], Rank(6), 0).is_err());
    }
}
