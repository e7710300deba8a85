//! Boxing: the steps that turn a tensor from the layout its producer made into the layout its
//! consumer needs, with the bytes each step moves.
//!
//! On one placement the planner walks mesh axes one at a time ([`rules::axis_step`] picks the
//! collective for each), searching the cheapest order and middle hops (Broadcast on an axis)
//! so that no step changes a split that an inner mesh axis still cuts further. Across
//! placements with one mesh shape and one nd-SBP, device `i` sends its tensor to device `i`
//! (send/recv, partial sums included). Otherwise it first removes partial sums on the source
//! (all-reduce or reduce-scatter), then each target device copies its region from the source
//! devices (slice-copy), zero-filling where the target is partial.
//! Every pair of layouts has a plan.

pub mod rules;
pub mod transfer;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use crate::{local_region, Error, NdSbp, Placement, Result, Sbp};

pub use rules::{axis_step, axis_step_bytes};
pub use transfer::{transfer_bytes, transfer_pieces, Piece};

/// Where and how a tensor lives: a placement and an nd-SBP over its mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The devices.
    pub placement: Placement,
    /// One SBP per mesh axis of the placement.
    pub nd_sbp: NdSbp,
}

impl Layout {
    /// A layout from a placement and an nd-SBP.
    pub fn new(placement: Placement, nd_sbp: impl Into<NdSbp>) -> Self {
        Layout { placement, nd_sbp: nd_sbp.into() }
    }

    /// True when both put the same elements on the same devices: the same placement, and the
    /// same SBP on every mesh axis of more than one device (on an axis of size 1, a split, a
    /// partial sum and a broadcast all hold the whole tensor).
    pub fn equivalent(&self, other: &Layout) -> bool {
        self.placement == other.placement
            && trivial_axes_broadcast(&self.nd_sbp, &self.placement)
                == trivial_axes_broadcast(&other.nd_sbp, &other.placement)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.nd_sbp, self.placement)
    }
}

/// What one boxing step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// `P -> B` on a mesh axis: sum over the group, everyone gets the sum.
    AllReduce {
        /// The mesh axis whose groups communicate.
        mesh_axis: usize,
    },
    /// `P -> S(tensor_axis)`: sum over the group, member `i` keeps slice `i`.
    ReduceScatter {
        /// The mesh axis.
        mesh_axis: usize,
        /// The tensor axis of the result's split.
        tensor_axis: usize,
    },
    /// `S(tensor_axis) -> B`: concatenate the group's slices.
    AllGather {
        /// The mesh axis.
        mesh_axis: usize,
        /// The tensor axis that was split.
        tensor_axis: usize,
    },
    /// `S(from_axis) -> S(to_axis)`: every member sends each other member its part.
    AllToAll {
        /// The mesh axis.
        mesh_axis: usize,
        /// The split axis before.
        from_axis: usize,
        /// The split axis after.
        to_axis: usize,
    },
    /// `B -> S(tensor_axis)`: member `i` keeps slice `i` of its copy (no communication).
    LocalSlice {
        /// The mesh axis.
        mesh_axis: usize,
        /// The tensor axis of the split.
        tensor_axis: usize,
    },
    /// `B -> P` (member 0 keeps its copy, the others hold zeros) or `S(a) -> P` (each member
    /// pads its slice with zeros to the group's region). No communication.
    ZeroFill {
        /// The mesh axis.
        mesh_axis: usize,
        /// The SBP before: Broadcast or a Split.
        from: Sbp,
    },
    /// Between two placements of the same mesh shape and the same layout: device `i` of the
    /// target receives device `i`'s tensor from the source (a pipeline-stage hand-off).
    SendRecv,
    /// Between any two placements: every target device copies its region from the source
    /// devices that hold it ([`transfer_pieces`]).
    SliceCopy,
}

impl StepKind {
    /// Short name for reports: `all-reduce`, `reduce-scatter` …
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::AllReduce { .. } => "all-reduce",
            StepKind::ReduceScatter { .. } => "reduce-scatter",
            StepKind::AllGather { .. } => "all-gather",
            StepKind::AllToAll { .. } => "all-to-all",
            StepKind::LocalSlice { .. } => "local-slice",
            StepKind::ZeroFill { .. } => "zero-fill",
            StepKind::SendRecv => "send-recv",
            StepKind::SliceCopy => "slice-copy",
        }
    }

    /// True for steps that move no bytes between devices.
    pub fn is_local(&self) -> bool {
        matches!(self, StepKind::LocalSlice { .. } | StepKind::ZeroFill { .. })
    }
}

/// One step of a [`BoxingPlan`].
#[derive(Clone, Debug, PartialEq)]
pub struct BoxingStep {
    /// What the step does.
    pub kind: StepKind,
    /// The layout before the step.
    pub before: Layout,
    /// The layout after the step.
    pub after: Layout,
    /// Devices in each communicating group (the mesh axis size; the target size across
    /// placements).
    pub group_size: usize,
    /// The most bytes one device receives in this step (see [`rules`] for the formulas).
    pub bytes_per_rank: u64,
}

impl fmt::Display for BoxingStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {} ({} B/rank, p={})",
            self.kind.name(),
            self.before,
            self.after,
            self.bytes_per_rank,
            self.group_size
        )
    }
}

/// The steps that convert one layout of a logical tensor into another.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxingPlan {
    /// The logical shape.
    pub logical: Vec<usize>,
    /// Bytes per element.
    pub dtype_size: usize,
    /// Where the tensor starts.
    pub source: Layout,
    /// Where it must end.
    pub target: Layout,
    /// The steps, in order.
    pub steps: Vec<BoxingStep>,
}

impl BoxingPlan {
    /// Bytes one device receives over the whole plan (the sum over steps).
    pub fn bytes_per_rank(&self) -> u64 {
        self.steps.iter().map(|step| step.bytes_per_rank).sum()
    }

    /// Steps that communicate (neither a local slice nor a zero-fill).
    pub fn communicating_steps(&self) -> usize {
        self.steps.iter().filter(|step| !step.kind.is_local()).count()
    }

    /// True when the source already is the target.
    pub fn is_identity(&self) -> bool {
        self.steps.is_empty()
    }
}

impl fmt::Display for BoxingPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            return f.write_str("none");
        }
        let steps: Vec<String> = self.steps.iter().map(ToString::to_string).collect();
        f.write_str(&steps.join("; "))
    }
}

/// Plans the conversion of a tensor of shape `logical` with `dtype_size`-byte elements from
/// `source` to `target`. Every pair of layouts has a plan; errors are only for malformed
/// layouts (a split axis out of range, an nd-SBP that does not fit its placement).
pub fn plan_boxing(
    logical: &[usize],
    dtype_size: usize,
    source: &Layout,
    target: &Layout,
) -> Result<BoxingPlan> {
    crate::check_layout("boxing source", logical, &source.nd_sbp, &source.placement)?;
    crate::check_layout("boxing target", logical, &target.nd_sbp, &target.placement)?;
    let tensor = TensorInfo { logical, dtype_size };
    let steps = if source.placement == target.placement {
        let (from, to) = (
            trivial_axes_broadcast(&source.nd_sbp, &source.placement),
            trivial_axes_broadcast(&target.nd_sbp, &target.placement),
        );
        tensor.axis_steps(&source.placement, &from, &to)
    } else {
        tensor.cross_placement_steps(source, target)?
    };
    Ok(BoxingPlan {
        logical: logical.to_vec(),
        dtype_size,
        source: source.clone(),
        target: target.clone(),
        steps,
    })
}

/// `nd_sbp` with Broadcast on every mesh axis of size 1: on one device, a split holds the
/// whole axis and a partial sum is the whole sum, so all three are the same layout there and
/// converting between them moves nothing.
fn trivial_axes_broadcast(nd_sbp: &NdSbp, placement: &Placement) -> NdSbp {
    let hierarchy = placement.hierarchy();
    NdSbp(
        nd_sbp
            .0
            .iter()
            .zip(hierarchy)
            .map(|(&sbp, &size)| if size == 1 { Sbp::Broadcast } else { sbp })
            .collect(),
    )
}

/// The logical tensor being boxed.
struct TensorInfo<'a> {
    logical: &'a [usize],
    dtype_size: usize,
}

/// A search state: the layout reached, and how.
type Cost = (u64, usize);

impl TensorInfo<'_> {
    /// The cheapest sequence of per-mesh-axis steps from `from` to `to` on one placement
    /// (Dijkstra over nd-SBPs whose axes take the source's, the target's or Broadcast).
    fn axis_steps(&self, placement: &Placement, from: &NdSbp, to: &NdSbp) -> Vec<BoxingStep> {
        let options: Vec<Vec<Sbp>> = (0..from.len())
            .map(|k| {
                let mut values = vec![from.0[k], to.0[k], Sbp::Broadcast];
                values.dedup();
                values.sort();
                values.dedup();
                values
            })
            .collect();
        let states = options.iter().map(Vec::len).product::<usize>();
        let decode = |mut code: usize| -> Vec<Sbp> {
            let mut state = vec![Sbp::Broadcast; options.len()];
            for k in (0..options.len()).rev() {
                state[k] = options[k][code % options[k].len()];
                code /= options[k].len();
            }
            state
        };
        let encode = |state: &[Sbp]| -> usize {
            state.iter().zip(&options).fold(0, |code, (sbp, values)| {
                code * values.len() + values.iter().position(|v| v == sbp).unwrap_or(0)
            })
        };
        let start = encode(&from.0);
        let goal = encode(&to.0);
        let mut best: Vec<Option<Cost>> = vec![None; states];
        let mut previous: Vec<Option<(usize, BoxingStep)>> = vec![None; states];
        let mut heap = BinaryHeap::new();
        best[start] = Some((0, 0));
        heap.push(Reverse(((0u64, 0usize), start)));
        while let Some(Reverse((cost, code))) = heap.pop() {
            if code == goal {
                break;
            }
            if best[code].is_some_and(|known| known < cost) {
                continue;
            }
            let state = decode(code);
            for (k, values) in options.iter().enumerate() {
                for &value in values {
                    let Some(step) = self.axis_move(placement, &state, k, value) else {
                        continue;
                    };
                    let mut next = state.clone();
                    next[k] = value;
                    let next_code = encode(&next);
                    let next_cost = (cost.0 + step.bytes_per_rank, cost.1 + 1);
                    if best[next_code].is_none_or(|known| next_cost < known) {
                        best[next_code] = Some(next_cost);
                        previous[next_code] = Some((code, step));
                        heap.push(Reverse((next_cost, next_code)));
                    }
                }
            }
        }
        let mut steps = Vec::new();
        let mut code = goal;
        while let Some((before, step)) = previous[code].take() {
            steps.push(step);
            code = before;
        }
        steps.reverse();
        steps
    }

    /// The step that sets mesh axis `k` of `state` to `value`, or `None` when nothing changes
    /// or when an inner mesh axis splits a tensor axis the step re-cuts (the nested ranges of
    /// the inner axis would move).
    fn axis_move(
        &self,
        placement: &Placement,
        state: &[Sbp],
        k: usize,
        value: Sbp,
    ) -> Option<BoxingStep> {
        let kind = axis_step(k, state[k], value)?;
        let touched = [state[k].split_axis(), value.split_axis()];
        let inner = state[k + 1..].iter().filter_map(|sbp| sbp.split_axis());
        if inner.into_iter().any(|axis| touched.contains(&Some(axis))) {
            return None;
        }
        let mut gathered = state.to_vec();
        gathered[k] = Sbp::Broadcast;
        let zero = vec![0; state.len()];
        let region = local_region(self.logical, &NdSbp(gathered), placement.hierarchy(), &zero);
        let group_bytes = region.map_or(0, |r| r.numel() * self.dtype_size) as u64;
        let group_size = placement.hierarchy()[k];
        let mut after = state.to_vec();
        after[k] = value;
        Some(BoxingStep {
            kind,
            before: Layout::new(placement.clone(), NdSbp(state.to_vec())),
            after: Layout::new(placement.clone(), NdSbp(after)),
            group_size,
            bytes_per_rank: axis_step_bytes(&kind, group_size, group_bytes),
        })
    }

    /// Steps between two different placements: remove partial sums on the source (trying
    /// Broadcast and each split as the middle layout), then one transfer to the target.
    fn cross_placement_steps(&self, source: &Layout, target: &Layout) -> Result<Vec<BoxingStep>> {
        let same_mesh = source.placement.hierarchy() == target.placement.hierarchy();
        if same_mesh && source.nd_sbp == target.nd_sbp {
            return Ok(vec![self.send_recv(source, target)?]);
        }
        let mut best: Option<(u64, Vec<BoxingStep>)> = None;
        for middle in self.middle_layouts(&source.nd_sbp) {
            let mut steps = self.axis_steps(&source.placement, &source.nd_sbp, &middle);
            steps.push(self.transfer(&Layout::new(source.placement.clone(), middle), target)?);
            let bytes = steps.iter().map(|step| step.bytes_per_rank).sum();
            if best.as_ref().is_none_or(|(known, _)| bytes < *known) {
                best = Some((bytes, steps));
            }
        }
        best.map(|(_, steps)| steps).ok_or_else(|| Error::Graph {
            reason: format!("no middle layout for boxing {source} -> {target}"),
        })
    }

    /// Non-partial layouts a partial source may reduce to before a transfer.
    fn middle_layouts(&self, nd_sbp: &NdSbp) -> Vec<NdSbp> {
        let mut layouts = vec![nd_sbp.without_partial()];
        if nd_sbp.has_partial() {
            layouts.extend((0..self.logical.len()).map(|axis| {
                NdSbp(
                    nd_sbp
                        .axes()
                        .iter()
                        .map(|&sbp| if sbp == Sbp::PartialSum { Sbp::Split(axis) } else { sbp })
                        .collect(),
                )
            }));
        }
        layouts
    }

    /// Device `i` of the target receives device `i`'s local tensor (partial sums included):
    /// both sides have one mesh shape and one nd-SBP.
    fn send_recv(&self, source: &Layout, target: &Layout) -> Result<BoxingStep> {
        let pieces = transfer_pieces(self.logical, source, target)?;
        Ok(BoxingStep {
            kind: StepKind::SendRecv,
            before: source.clone(),
            after: target.clone(),
            group_size: target.placement.size(),
            bytes_per_rank: transfer_bytes(&pieces, self.dtype_size),
        })
    }

    /// The slice-copy step from a non-partial `source` to `target`.
    fn transfer(&self, source: &Layout, target: &Layout) -> Result<BoxingStep> {
        let pieces = transfer_pieces(self.logical, source, target)?;
        Ok(BoxingStep {
            kind: StepKind::SliceCopy,
            before: source.clone(),
            after: target.clone(),
            group_size: target.placement.size(),
            bytes_per_rank: transfer_bytes(&pieces, self.dtype_size),
        })
    }
}
