//! Op signatures: the SBP of every input and output that makes the local computation exact.

use std::fmt;

use crate::{NdSbp, Sbp};

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
