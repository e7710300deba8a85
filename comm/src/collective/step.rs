//! The receiving side of one pipelined ring step: it takes each piece as the transport delivers
//! it ([`Delivery`]: a header, then payload slices straight from the transport's buffers) and
//! reduces or places the bytes at once, while the cache still holds them. Nothing is read into a
//! buffer of its own first.
//!
//! - [`ReduceStep`] (reduce-scatter): a piece's bytes land in a pooled buffer and are reduced
//!   with this member's input there; on the last step they are also written to this member's
//!   chunk of the result.
//! - [`GatherStep`] (all-gather): a piece's bytes go straight to their place in the output and,
//!   when the next step forwards the piece, to a pooled buffer as well.

use std::ops::Range;
use std::sync::Arc;

use meshflow_ops::buffers::BufferPool;
use meshflow_ops::{CpuStorage, DType, Storage, Tensor, TensorMeta};

use super::ring::{check_tag, sub_range, tag, Call};
use crate::reduce::{reduce_into, reduce_received};
use crate::{Delivery, Error, Rank, ReduceOp, Result, Tag};

/// What one ring step receives: `parts` pieces of the element range `chunk` from `peer`, tagged
/// as ring step `step` of `call`.
pub(super) struct StepPlan {
    pub call: Call,
    pub peer: Rank,
    pub step: usize,
    pub parts: usize,
    pub chunk: Range<usize>,
    pub dtype: DType,
}

impl StepPlan {
    /// The elements of piece `k`, once its header matches what this step expects.
    fn check(&self, k: usize, received: Tag, meta: &TensorMeta) -> Result<Range<usize>> {
        check_tag(self.call, tag(self.call, self.step, self.parts, k), self.peer, received)?;
        let elements = sub_range(&self.chunk, self.parts, k);
        if meta.dtype != self.dtype || meta.shape.numel() != elements.len() {
            return Err(Error::SizeMismatch {
                collective: self.call.kind.name(),
                peer: self.peer,
                expected: format!("{} [{}]", self.dtype, elements.len()),
                received: format!("{} {:?}", meta.dtype, meta.shape.dims()),
            });
        }
        Ok(elements)
    }

    fn payload_error(&self, reason: &str) -> Error {
        Error::InvalidFrame {
            peer: self.peer,
            reason: format!("{}: {reason}", self.call.kind.name()),
        }
    }
}

/// The piece being received: its elements, where its bytes are kept (if anywhere) and how many
/// have arrived.
struct Landing {
    elements: Range<usize>,
    storage: Option<CpuStorage>,
    length: usize,
    filled: usize,
}

impl Landing {
    fn new(elements: Range<usize>, size: usize, keep: Option<&Arc<BufferPool>>) -> Self {
        let length = elements.len() * size;
        let storage = keep.map(|pool| CpuStorage::for_overwrite(length, pool));
        Landing { elements, storage, length, filled: 0 }
    }

    /// Counts the next `length` payload bytes in; the byte range of the piece they fill.
    fn advance(&mut self, length: usize, plan: &StepPlan) -> Result<Range<usize>> {
        let range = self.filled..self.filled + length;
        if range.end > self.length {
            return Err(plan.payload_error("more payload than its header announced"));
        }
        self.filled = range.end;
        Ok(range)
    }

    /// Copies `bytes`, which fill `range` of the piece, into the kept storage (if any).
    fn keep(&mut self, range: Range<usize>, bytes: &[u8]) {
        if let Some(storage) = self.storage.as_mut() {
            storage.bytes_mut()[range].copy_from_slice(bytes);
        }
    }

    fn full(&self) -> bool {
        self.filled == self.length
    }

    fn into_tensor(self, dtype: DType) -> Result<Option<Tensor>> {
        let Some(storage) = self.storage else { return Ok(None) };
        let meta = TensorMeta::new([self.elements.len()], dtype);
        Ok(Some(Tensor::from_storage(meta, Arc::new(Storage::Cpu(storage)))?))
    }
}

/// Receives one reduce-scatter step: piece `k` of the incoming chunk, reduced with this
/// member's input, becomes piece `k` of what the next step sends.
pub(super) struct ReduceStep<'a> {
    plan: StepPlan,
    mine: &'a [u8],
    operation: ReduceOp,
    buffers: &'a Arc<BufferPool>,
    /// On the last step, this member's chunk of the result.
    output: Option<&'a mut [u8]>,
    landing: Option<Landing>,
    reduced: usize,
    pieces: Vec<Tensor>,
}

impl<'a> ReduceStep<'a> {
    /// A step that reduces what `plan` describes with `mine` (this member's whole input);
    /// `output`, if given, is this member's chunk of the result (the chunk `plan` receives).
    pub fn new(
        plan: StepPlan,
        mine: &'a [u8],
        operation: ReduceOp,
        buffers: &'a Arc<BufferPool>,
        output: Option<&'a mut [u8]>,
    ) -> Self {
        let pieces = Vec::with_capacity(plan.parts);
        ReduceStep { plan, mine, operation, buffers, output, landing: None, reduced: 0, pieces }
    }

    /// Takes the next part of piece `k`.
    pub fn deliver(&mut self, k: usize, delivery: Delivery<'_>) -> Result<()> {
        match delivery {
            Delivery::Header { tag, meta } => {
                let elements = self.plan.check(k, tag, meta)?;
                let size = self.plan.dtype.size();
                self.landing = Some(Landing::new(elements, size, Some(self.buffers)));
                self.reduced = 0;
            }
            Delivery::Payload(bytes) => self.reduce_slice(bytes)?,
        }
        self.finish_piece()
    }

    /// Reduces the elements a payload slice completes. The whole elements inside the slice are
    /// reduced straight from it; an element split between two slices is put together in the
    /// piece's storage first and reduced there.
    fn reduce_slice(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(landing) = self.landing.as_mut() else {
            return Err(self.plan.payload_error("payload without a header"));
        };
        let filled = landing.advance(bytes.len(), &self.plan)?;
        let size = self.plan.dtype.size();
        let aligned = filled.start.next_multiple_of(size).min(filled.end);
        let whole = (filled.end / size * size).max(aligned);
        landing.keep(filled.start..aligned, &bytes[..aligned - filled.start]);
        landing.keep(whole..filled.end, &bytes[whole - filled.start..]);
        let Some(storage) = landing.storage.as_mut() else { return Ok(()) };
        let start = landing.elements.start * size;
        let (name, dtype) = (self.plan.call.kind.name(), self.plan.dtype);
        let target = storage.bytes_mut();
        let split_end = aligned.min(filled.end / size * size);
        if split_end > self.reduced {
            let mine = &self.mine[start + self.reduced..start + split_end];
            reduce_into(name, &mut target[self.reduced..split_end], mine, dtype, self.operation)?;
        }
        if whole > aligned {
            let received = &bytes[aligned - filled.start..whole - filled.start];
            let mine = &self.mine[start + aligned..start + whole];
            reduce_received(
                name,
                &mut target[aligned..whole],
                received,
                mine,
                dtype,
                self.operation,
            )?;
        }
        let done = filled.end / size * size;
        if let Some(output) = self.output.as_deref_mut() {
            let offset = start - self.plan.chunk.start * size;
            output[offset + self.reduced..offset + done]
                .copy_from_slice(&target[self.reduced..done]);
        }
        self.reduced = self.reduced.max(done);
        Ok(())
    }

    fn finish_piece(&mut self) -> Result<()> {
        if self.landing.as_ref().is_some_and(Landing::full) {
            if let Some(landing) = self.landing.take() {
                self.pieces.extend(landing.into_tensor(self.plan.dtype)?);
            }
        }
        Ok(())
    }

    /// The reduced pieces, in order, once every piece arrived whole.
    pub fn finish(self) -> Result<Vec<Tensor>> {
        if self.landing.is_some() || self.pieces.len() != self.plan.parts {
            return Err(self.plan.payload_error("the step ended before every piece arrived"));
        }
        Ok(self.pieces)
    }
}

/// Receives one all-gather step: piece `k` of the incoming chunk lands in its place in the
/// output and, when `forward`, in a buffer of its own that the next step sends on.
pub(super) struct GatherStep<'a> {
    plan: StepPlan,
    output: &'a mut [u8],
    forward: Option<&'a Arc<BufferPool>>,
    landing: Option<Landing>,
    completed: usize,
    pieces: Vec<Tensor>,
}

impl<'a> GatherStep<'a> {
    /// A step that places what `plan` describes in `output` (the whole result); `forward` keeps
    /// a copy of each piece (from that pool) for the next step.
    pub fn new(plan: StepPlan, output: &'a mut [u8], forward: Option<&'a Arc<BufferPool>>) -> Self {
        GatherStep { plan, output, forward, landing: None, completed: 0, pieces: Vec::new() }
    }

    /// Takes the next part of piece `k`.
    pub fn deliver(&mut self, k: usize, delivery: Delivery<'_>) -> Result<()> {
        let size = self.plan.dtype.size();
        match delivery {
            Delivery::Header { tag, meta } => {
                let elements = self.plan.check(k, tag, meta)?;
                self.landing = Some(Landing::new(elements, size, self.forward));
            }
            Delivery::Payload(bytes) => {
                let Some(landing) = self.landing.as_mut() else {
                    return Err(self.plan.payload_error("payload without a header"));
                };
                let filled = landing.advance(bytes.len(), &self.plan)?;
                landing.keep(filled.clone(), bytes);
                let start = landing.elements.start * size;
                self.output[start + filled.start..start + filled.end].copy_from_slice(bytes);
            }
        }
        if self.landing.as_ref().is_some_and(Landing::full) {
            if let Some(landing) = self.landing.take() {
                self.completed += 1;
                self.pieces.extend(landing.into_tensor(self.plan.dtype)?);
            }
        }
        Ok(())
    }

    /// The pieces to forward (none unless `forward`), once every piece arrived whole.
    pub fn finish(self) -> Result<Vec<Tensor>> {
        if self.landing.is_some() || self.completed != self.plan.parts {
            return Err(self.plan.payload_error("the step ended before every piece arrived"));
        }
        Ok(self.pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageKind;

    fn plan(step: usize, parts: usize, chunk: Range<usize>) -> StepPlan {
        let call = Call { kind: MessageKind::AllReduce, sequence: 3 };
        StepPlan { call, peer: Rank(1), step, parts, chunk, dtype: DType::F32 }
    }

    /// Delivers piece `k` of `plan` holding `values`, its payload cut into slices of 1, 2, 3, …
    /// bytes (so that most slices end inside an element).
    fn deliver_cut(
        deliver: &mut dyn FnMut(usize, Delivery<'_>) -> Result<()>,
        plan: &StepPlan,
        k: usize,
        values: &[f32],
    ) {
        let meta = TensorMeta::new([values.len()], DType::F32);
        let tag = tag(plan.call, plan.step, plan.parts, k);
        deliver(k, Delivery::Header { tag, meta: &meta }).expect("header");
        let mut bytes: &[u8] = bytemuck::cast_slice(values);
        let mut cut = 1;
        while !bytes.is_empty() {
            let (slice, rest) = bytes.split_at(cut.min(bytes.len()));
            deliver(k, Delivery::Payload(slice)).expect("payload");
            bytes = rest;
            cut += 1;
        }
    }

    #[test]
    fn reduce_step_reduces_slices_that_split_elements() {
        let buffers = Arc::new(BufferPool::new(0));
        let mine: Vec<f32> = (0..20).map(|value| value as f32).collect();
        let mut output = vec![0u8; 10 * 4];
        // Chunk 10..20 in two pieces of 5 elements; received values are 100 + element.
        let mut step = ReduceStep::new(
            plan(0, 2, 10..20),
            bytemuck::cast_slice(&mine),
            ReduceOp::Sum,
            &buffers,
            Some(&mut output),
        );
        let check = plan(0, 2, 10..20);
        for k in 0..2 {
            let received: Vec<f32> = (0..5).map(|e| 100.0 + (10 + 5 * k + e) as f32).collect();
            deliver_cut(&mut |k, part| step.deliver(k, part), &check, k, &received);
        }
        let pieces = step.finish().expect("every piece");
        let expected: Vec<f32> = (10..20).map(|element| 100.0 + 2.0 * element as f32).collect();
        let reduced: Vec<f32> =
            pieces.iter().flat_map(|p| p.to_vec::<f32>().expect("f32")).collect();
        assert_eq!(reduced, expected);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&output), &expected[..]);
    }

    #[test]
    fn gather_step_places_slices_and_rejects_a_wrong_header() {
        let buffers = Arc::new(BufferPool::new(0));
        let mut output = vec![0u8; 8 * 4];
        let mut step = GatherStep::new(plan(1, 1, 4..8), &mut output, Some(&buffers));
        let values = [1.5f32, 2.5, 3.5, 4.5];
        deliver_cut(&mut |k, part| step.deliver(k, part), &plan(1, 1, 4..8), 0, &values);
        let forwarded = step.finish().expect("every piece");
        assert_eq!(forwarded[0].to_vec::<f32>().expect("f32"), values);
        let placed = bytemuck::cast_slice::<u8, f32>(&output);
        assert_eq!(&placed[4..], &values);
        let mut other = vec![0u8; 8 * 4];
        let mut step = GatherStep::new(plan(1, 1, 4..8), &mut other, None);
        let meta = TensorMeta::new([3], DType::F32);
        let tag = tag(plan(1, 1, 4..8).call, 1, 1, 0);
        let error = step.deliver(0, Delivery::Header { tag, meta: &meta }).expect_err("3 of 4");
        assert!(matches!(error, Error::SizeMismatch { peer: Rank(1), .. }), "{error}");
    }
}
