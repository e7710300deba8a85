//! Op signatures: the SBP of every input and output that makes the local computation exact.

use std::fmt;

use crate::{Error, NdSbp, Result, Sbp};

/// A 1-D signature: one [`Sbp`] per input and per output of an op, on one mesh axis.
///
/// Example, matmul `y = a·b`: `S(0), B -> S(0)` (rows of `a` split), `B, S(1) -> S(1)` (columns of
/// `b` split), `S(1), S(0) -> P` (the contracted axis split: each device holds a partial sum).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Signature {
    /// SBP of each input, in the op's input order.
    pub inputs: Vec<Sbp>,
    /// SBP of each output, in the op's output order.
    pub outputs: Vec<Sbp>,
}

impl Signature {
    /// A signature from input and output SBPs.
    pub fn new(inputs: impl Into<Vec<Sbp>>, outputs: impl Into<Vec<Sbp>>) -> Self {
        Signature { inputs: inputs.into(), outputs: outputs.into() }
    }

    /// All-Broadcast: every device computes the whole op. It always exists.
    pub fn broadcast(num_inputs: usize, num_outputs: usize) -> Self {
        Signature::new(vec![Sbp::Broadcast; num_inputs], vec![Sbp::Broadcast; num_outputs])
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_list(f, &self.inputs)?;
        f.write_str(" -> ")?;
        write_list(f, &self.outputs)
    }
}

fn write_list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// An nd signature: one [`NdSbp`] per input and output; axis `k` of each is a 1-D signature of
/// the op on mesh axis `k`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NdSignature {
    /// nd-SBP of each input.
    pub inputs: Vec<NdSbp>,
    /// nd-SBP of each output.
    pub outputs: Vec<NdSbp>,
}

impl NdSignature {
    /// The product of 1-D signatures, one per mesh axis.
    pub fn from_axes(per_axis: &[Signature]) -> Self {
        let first = per_axis.first();
        let inputs = (0..first.map_or(0, |s| s.inputs.len()))
            .map(|i| NdSbp(per_axis.iter().map(|s| s.inputs[i]).collect()))
            .collect();
        let outputs = (0..first.map_or(0, |s| s.outputs.len()))
            .map(|o| NdSbp(per_axis.iter().map(|s| s.outputs[o]).collect()))
            .collect();
        NdSignature { inputs, outputs }
    }

    /// The 1-D signature on mesh axis `axis`.
    pub fn axis(&self, axis: usize) -> Signature {
        Signature {
            inputs: self.inputs.iter().map(|s| s.0[axis]).collect(),
            outputs: self.outputs.iter().map(|s| s.0[axis]).collect(),
        }
    }
}

impl fmt::Display for NdSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_list(f, &self.inputs)?;
        f.write_str(" -> ")?;
        write_list(f, &self.outputs)
    }
}

impl Signature {
    /// Checks arity against the op's input and output ranks and that every split axis is in
    /// range; the error names `op` and lists `candidates`.
    pub fn check(
        &self,
        op: &str,
        input_ranks: &[usize],
        output_ranks: &[usize],
        candidates: &[Signature],
    ) -> Result<()> {
        let invalid = |reason: String| Error::InvalidSignature {
            op: op.to_string(),
            signature: self.to_string(),
            candidates: list_text(candidates),
            reason,
        };
        if self.inputs.len() != input_ranks.len() || self.outputs.len() != output_ranks.len() {
            return Err(invalid(format!(
                "the op has {} inputs and {} outputs",
                input_ranks.len(),
                output_ranks.len()
            )));
        }
        let sbps = self.inputs.iter().chain(&self.outputs);
        let ranks = input_ranks.iter().chain(output_ranks);
        for (sbp, &rank) in sbps.zip(ranks) {
            if let Some(axis) = sbp.split_axis().filter(|&axis| axis >= rank) {
                return Err(invalid(format!("split axis {axis} on a tensor of rank {rank}")));
            }
        }
        Ok(())
    }
}

/// The nd signatures of an op on a mesh with `mesh_axes` axes: every product of its 1-D
/// signatures, one per mesh axis (`|signatures|^mesh_axes` of them, duplicates removed).
///
/// ```
/// use meshflow_placement::{nd_signatures, Sbp, Signature};
/// let one_d = [Signature::new([Sbp::Broadcast], [Sbp::Broadcast]),
///              Signature::new([Sbp::Split(0)], [Sbp::Split(0)])];
/// assert_eq!(nd_signatures(&one_d, 2).len(), 4);
/// ```
pub fn nd_signatures(signatures: &[Signature], mesh_axes: usize) -> Vec<NdSignature> {
    let mut products: Vec<Vec<Signature>> = vec![Vec::new()];
    for _ in 0..mesh_axes {
        products = products
            .into_iter()
            .flat_map(|prefix| {
                signatures.iter().map(move |signature| {
                    let mut next = prefix.clone();
                    next.push(signature.clone());
                    next
                })
            })
            .collect();
    }
    let mut seen = std::collections::HashSet::new();
    products
        .iter()
        .map(|per_axis| NdSignature::from_axes(per_axis))
        .filter(|signature| seen.insert(signature.clone()))
        .collect()
}

/// Candidate signatures as one line of text, for errors.
pub fn list_text<T: fmt::Display>(items: &[T]) -> String {
    let texts: Vec<String> = items.iter().map(|item| format!("[{item}]")).collect();
    texts.join(" ")
}

/// The position of the first candidate whose inputs are exactly `inputs` (no boxing allowed),
/// or an error naming `op`, the input SBPs and the candidates.
///
/// ```
/// use meshflow_placement::{find_signature, nd_signatures, NdSbp, Sbp, Signature};
/// let one_d = [Signature::broadcast(1, 1), Signature::new([Sbp::Split(0)], [Sbp::Split(0)])];
/// let candidates = nd_signatures(&one_d, 1);
/// assert_eq!(find_signature("relu", &candidates, &[NdSbp::from(Sbp::Split(0))]).unwrap(), 1);
/// assert!(find_signature("relu", &candidates, &[NdSbp::from(Sbp::PartialSum)]).is_err());
/// ```
pub fn find_signature(op: &str, candidates: &[NdSignature], inputs: &[NdSbp]) -> Result<usize> {
    candidates.iter().position(|candidate| candidate.inputs == inputs).ok_or_else(|| {
        Error::NoSignature {
            op: op.to_string(),
            inputs: list_text(inputs),
            candidates: list_text(candidates),
            reason: "no candidate takes these inputs as they are".into(),
        }
    })
}
