//! Placements: a device type and a mesh of ranks, written as text (`cpu:0-3`, `cuda:[[0,1],[2,3]]`).

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The kind of device every rank of a placement uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// A CPU device (a thread with a share of the cores).
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

impl DeviceType {
    /// The name used in placement text: `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Cpu => "cpu",
            DeviceType::Cuda => "cuda",
        }
    }
}

/// A set of devices arranged as a mesh.
///
/// `hierarchy` is the mesh shape (`[4]`, `[2, 2]`, `[2, 3]` …) and `ranks` the device ranks in
/// row-major order over it, so the rank at coordinates `c` is `ranks[Σ c_k · stride_k]`.
///
/// ```
/// use meshflow_placement::Placement;
/// let p: Placement = "cuda:[[0,1],[2,3]]".parse().unwrap();
/// assert_eq!(p.hierarchy(), &[2, 2]);
/// assert_eq!(p.coordinates(2), Some(vec![1, 0]));
/// assert_eq!(p.groups(1), vec![vec![0, 1], vec![2, 3]]);
/// assert_eq!(p.to_string(), "cuda:[[0,1],[2,3]]");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placement {
    device: DeviceType,
    hierarchy: Vec<usize>,
    ranks: Vec<usize>,
}

impl Placement {
    /// A placement from a device type, a mesh shape and the ranks in row-major order.
    pub fn new(device: DeviceType, hierarchy: Vec<usize>, ranks: Vec<usize>) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidPlacement {
            hierarchy: hierarchy.clone(),
            ranks: ranks.clone(),
            reason: reason.to_string(),
        };
        if hierarchy.is_empty() || hierarchy.contains(&0) {
            return Err(invalid("every mesh axis needs at least one rank"));
        }
        if hierarchy.iter().product::<usize>() != ranks.len() {
            return Err(invalid("the number of ranks is not the product of the hierarchy"));
        }
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(invalid("a rank appears twice"));
        }
        Ok(Placement { device, hierarchy, ranks })
    }

    /// A one-axis placement over ranks `0..size`.
    pub fn line(device: DeviceType, size: usize) -> Result<Self> {
        Self::new(device, vec![size], (0..size).collect())
    }

    /// A placement over ranks `0..Π hierarchy` with the given mesh shape.
    pub fn grid(device: DeviceType, hierarchy: &[usize]) -> Result<Self> {
        let size = hierarchy.iter().product();
        Self::new(device, hierarchy.to_vec(), (0..size).collect())
    }

    /// The device type.
    pub fn device(&self) -> DeviceType {
        self.device
    }

    /// The mesh shape.
    pub fn hierarchy(&self) -> &[usize] {
        &self.hierarchy
    }

    /// The ranks, row-major over the mesh.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// Number of devices.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Number of mesh axes.
    pub fn mesh_axes(&self) -> usize {
        self.hierarchy.len()
    }

    /// The mesh coordinates of the device at row-major position `index`.
    pub fn coordinates_of_index(&self, index: usize) -> Vec<usize> {
        let mut coordinates = vec![0; self.hierarchy.len()];
        let mut rest = index;
        for (axis, &size) in self.hierarchy.iter().enumerate().rev() {
            coordinates[axis] = rest % size;
            rest /= size;
        }
        coordinates
    }

    /// The row-major position of the device at `coordinates` (which must be inside the mesh).
    pub fn index_of_coordinates(&self, coordinates: &[usize]) -> usize {
        coordinates.iter().zip(&self.hierarchy).fold(0, |index, (&c, &size)| index * size + c)
    }

    /// The mesh coordinates of `rank`, or `None` when the placement does not hold it.
    pub fn coordinates(&self, rank: usize) -> Option<Vec<usize>> {
        let index = self.ranks.iter().position(|&r| r == rank)?;
        Some(self.coordinates_of_index(index))
    }

    /// The rank at `coordinates`, or an error naming the placement when outside the mesh.
    pub fn rank_at(&self, coordinates: &[usize]) -> Result<usize> {
        let inside = coordinates.len() == self.hierarchy.len()
            && coordinates.iter().zip(&self.hierarchy).all(|(&c, &size)| c < size);
        if !inside {
            return Err(Error::NotInPlacement {
                placement: self.to_string(),
                reason: format!("coordinates {coordinates:?} are outside the mesh"),
            });
        }
        Ok(self.ranks[self.index_of_coordinates(coordinates)])
    }

    /// The sub-groups along mesh axis `axis`, as row-major positions: each group holds the
    /// devices whose coordinates differ only on `axis`, in the order of that coordinate. A
    /// collective on that mesh axis runs once inside each group.
    pub fn group_indices(&self, axis: usize) -> Vec<Vec<usize>> {
        (0..self.size())
            .filter(|&index| self.coordinates_of_index(index)[axis] == 0)
            .map(|first| self.group_of_index(first, axis))
            .collect()
    }

    /// The positions of the group along `axis` that the device at position `index` belongs to.
    pub fn group_of_index(&self, index: usize, axis: usize) -> Vec<usize> {
        let mut coordinates = self.coordinates_of_index(index);
        (0..self.hierarchy[axis])
            .map(|c| {
                coordinates[axis] = c;
                self.index_of_coordinates(&coordinates)
            })
            .collect()
    }

    /// The sub-groups along mesh axis `axis`, as ranks (see [`Placement::group_indices`]).
    pub fn groups(&self, axis: usize) -> Vec<Vec<usize>> {
        self.group_indices(axis)
            .into_iter()
            .map(|group| group.into_iter().map(|index| self.ranks[index]).collect())
            .collect()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.device.name())?;
        let contiguous = self.ranks.windows(2).all(|pair| pair[1] == pair[0] + 1);
        if self.hierarchy.len() == 1 && contiguous {
            let first = self.ranks[0];
            return match self.ranks.len() {
                1 => write!(f, "{first}"),
                n => write!(f, "{first}-{}", first + n - 1),
            };
        }
        write_nested(f, &self.hierarchy, &self.ranks)
    }
}

fn write_nested(f: &mut fmt::Formatter<'_>, hierarchy: &[usize], ranks: &[usize]) -> fmt::Result {
    f.write_str("[")?;
    let chunk = ranks.len() / hierarchy[0];
    for (i, part) in ranks.chunks(chunk).enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        if hierarchy.len() == 1 {
            write!(f, "{}", part[0])?;
        } else {
            write_nested(f, &hierarchy[1..], part)?;
        }
    }
    f.write_str("]")
}

impl FromStr for Placement {
    type Err = Error;

    /// Parses `device:mesh`, where `device` is `cpu` or `cuda` and `mesh` is a rank (`3`), a
    /// range (`0-3`) or a nested list of ranks and ranges (`[0,2,4]`, `[[0,1],[2,3]]`,
    /// `[0-3]`). Whitespace is ignored.
    fn from_str(text: &str) -> Result<Self> {
        let syntax = |reason: String| Error::PlacementSyntax { text: text.to_string(), reason };
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (device, mesh) = compact.split_once(':').ok_or_else(|| syntax("no `:`".into()))?;
        let device = match device {
            "cpu" => DeviceType::Cpu,
            "cuda" | "gpu" => DeviceType::Cuda,
            other => return Err(syntax(format!("unknown device type `{other}`"))),
        };
        let mut parser = Parser { bytes: mesh.as_bytes(), position: 0 };
        let node = parser.node().map_err(syntax)?;
        if parser.position != parser.bytes.len() {
            return Err(syntax(format!("unexpected text at byte {}", parser.position)));
        }
        let (hierarchy, ranks) = flatten(&node).map_err(syntax)?;
        Placement::new(device, hierarchy, ranks).map_err(|error| syntax(error.to_string()))
    }
}

/// A parsed mesh before it is checked to be rectangular.
enum Node {
    /// A rank or a range outside brackets.
    Bare(Vec<usize>),
    /// A bracketed list of ranks and ranges: one mesh axis.
    Ranks(Vec<usize>),
    /// A list of sub-meshes.
    List(Vec<Node>),
}

struct Parser<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn node(&mut self) -> Result<Node, String> {
        if self.peek() != Some(b'[') {
            return self.range().map(Node::Bare);
        }
        self.position += 1;
        let mut items = vec![self.node()?];
        while self.peek() == Some(b',') {
            self.position += 1;
            items.push(self.node()?);
        }
        if self.peek() != Some(b']') {
            return Err(format!("expected `,` or `]` at byte {}", self.position));
        }
        self.position += 1;
        let bare = items.iter().filter(|item| matches!(item, Node::Bare(_))).count();
        if bare == 0 {
            return Ok(Node::List(items));
        }
        if bare < items.len() {
            return Err("a list mixes ranks and sub-lists".into());
        }
        let ranks = items.into_iter().flat_map(|item| match item {
            Node::Bare(ranks) | Node::Ranks(ranks) => ranks,
            Node::List(_) => Vec::new(),
        });
        Ok(Node::Ranks(ranks.collect()))
    }

    fn range(&mut self) -> Result<Vec<usize>, String> {
        let first = self.number()?;
        if self.peek() != Some(b'-') {
            return Ok(vec![first]);
        }
        self.position += 1;
        let last = self.number()?;
        if last < first {
            return Err(format!("range {first}-{last} runs backwards"));
        }
        Ok((first..=last).collect())
    }

    fn number(&mut self) -> Result<usize, String> {
        let start = self.position;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.position += 1;
        }
        let digits = std::str::from_utf8(&self.bytes[start..self.position]).unwrap_or("");
        digits.parse().map_err(|_| format!("expected a rank at byte {start}"))
    }
}

/// The hierarchy and row-major ranks of a parsed mesh; an error when it is ragged.
fn flatten(node: &Node) -> Result<(Vec<usize>, Vec<usize>), String> {
    match node {
        Node::Bare(ranks) | Node::Ranks(ranks) => Ok((vec![ranks.len()], ranks.clone())),
        Node::List(items) => {
            let mut hierarchy = None;
            let mut ranks = Vec::new();
            for item in items {
                let (inner, inner_ranks) = flatten(item)?;
                if hierarchy.get_or_insert_with(|| inner.clone()) != &inner {
                    return Err("sub-lists have different shapes (the mesh is ragged)".into());
                }
                ranks.extend(inner_ranks);
            }
            let mut shape = vec![items.len()];
            shape.extend(hierarchy.unwrap_or_default());
            Ok((shape, ranks))
        }
    }
}
