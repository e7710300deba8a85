//! Wire frames: a length-prefixed rkyv header, validated with bytecheck before any field is
//! used, followed by the raw payload bytes (outside rkyv, so they are never copied through it).
//!
//! ```text
//! u32 little-endian header length | rkyv FrameHeader | payload (header.payload_bytes bytes)
//! ```
//!
//! [`decode_header`] refuses, before allocating anything: a header longer than
//! [`MAX_HEADER_BYTES`], bytes that are not a valid archived header, a protocol version other than
//! [`PROTOCOL_VERSION`], an unknown kind or dtype, more than [`MAX_DIMS`] dimensions, a payload
//! length that disagrees with dtype × shape, and a frame longer than the caller's maximum.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use meshflow_ops::{DType, Shape, TensorMeta};

use crate::{Error, MessageKind, Rank, Result, Tag};

/// The version of the frame format; a frame of another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// Longest header accepted.
pub const MAX_HEADER_BYTES: usize = 1024;
/// Most dimensions a tensor in a frame may have.
pub const MAX_DIMS: usize = 16;
/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;

/// The header as it travels (archived with rkyv).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// [`MessageKind`] code.
    pub kind: u8,
    /// The collective call's sequence number on its group.
    pub sequence: u64,
    /// The step inside the collective.
    pub step: u32,
    /// [`DType`] code (index in [`DType::ALL`]).
    pub dtype: u8,
    /// Dimensions of the tensor.
    pub shape: Vec<u64>,
    /// Bytes of payload after the header.
    pub payload_bytes: u64,
}

/// A validated header: what the receiver may act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Kind, sequence and step.
    pub tag: Tag,
    /// Shape and dtype of the payload.
    pub meta: TensorMeta,
    /// Bytes of payload that follow.
    pub payload_bytes: usize,
}

/// The length prefix and archived header for a tensor of `meta` sent under `tag`.
pub fn encode_header(tag: Tag, meta: &TensorMeta) -> Result<Vec<u8>> {
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        kind: tag.kind.code(),
        sequence: tag.sequence,
        step: tag.step,
        dtype: dtype_code(meta.dtype),
        shape: meta.shape.dims().iter().map(|&dim| dim as u64).collect(),
        payload_bytes: meta.bytes() as u64,
    };
    let archived =
        rkyv::to_bytes::<rancor::Error>(&header).map_err(|error| Error::InvalidArgument {
            collective: "send",
            reason: format!("frame header could not be encoded: {error}"),
        })?;
    let length = u32::try_from(archived.len()).unwrap_or(u32::MAX);
    Ok([&length.to_le_bytes()[..], &archived[..]].concat())
}

/// The header length announced by a 4-byte prefix, checked against [`MAX_HEADER_BYTES`].
pub fn header_length(prefix: [u8; LENGTH_BYTES], peer: Rank) -> Result<usize> {
    let length = u32::from_le_bytes(prefix) as usize;
    if length == 0 || length > MAX_HEADER_BYTES {
        return Err(invalid(
            peer,
            format!("header length {length} outside 1..={MAX_HEADER_BYTES}"),
        ));
    }
    Ok(length)
}

/// Validates archived header bytes (without the prefix) and converts them.
pub fn decode_header(bytes: &[u8], peer: Rank, max_frame_bytes: u64) -> Result<Decoded> {
    if bytes.len() > MAX_HEADER_BYTES {
        return Err(invalid(peer, format!("header of {} bytes is too long", bytes.len())));
    }
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let archived = rkyv::access::<ArchivedFrameHeader, rancor::Error>(&aligned)
        .map_err(|error| invalid(peer, format!("header failed validation: {error}")))?;
    let header = rkyv::deserialize::<FrameHeader, rancor::Error>(archived)
        .map_err(|error| invalid(peer, format!("header failed to deserialize: {error}")))?;
    validate(header, bytes.len(), peer, max_frame_bytes)
}

/// Decodes a whole frame held in memory: the validated header and the payload slice.
pub fn decode_frame(frame: &[u8], peer: Rank, max_frame_bytes: u64) -> Result<(Decoded, &[u8])> {
    let (prefix, rest) = frame
        .split_first_chunk::<LENGTH_BYTES>()
        .ok_or_else(|| invalid(peer, "frame shorter than its length prefix".into()))?;
    let length = header_length(*prefix, peer)?;
    let header =
        rest.get(..length).ok_or_else(|| invalid(peer, "frame ends inside its header".into()))?;
    let decoded = decode_header(header, peer, max_frame_bytes)?;
    let payload = &rest[length..];
    if payload.len() != decoded.payload_bytes {
        let reason =
            format!("payload has {} bytes, header says {}", payload.len(), decoded.payload_bytes);
        return Err(invalid(peer, reason));
    }
    Ok((decoded, payload))
}

fn validate(
    header: FrameHeader,
    header_bytes: usize,
    peer: Rank,
    max_frame_bytes: u64,
) -> Result<Decoded> {
    if header.version != PROTOCOL_VERSION {
        return Err(invalid(
            peer,
            format!("protocol version {} (this build speaks {PROTOCOL_VERSION})", header.version),
        ));
    }
    let kind = MessageKind::from_code(header.kind)
        .ok_or_else(|| invalid(peer, format!("unknown message kind {}", header.kind)))?;
    let dtype = DType::ALL
        .get(header.dtype as usize)
        .copied()
        .ok_or_else(|| invalid(peer, format!("unknown dtype code {}", header.dtype)))?;
    if header.shape.len() > MAX_DIMS {
        return Err(invalid(
            peer,
            format!("{} dimensions (at most {MAX_DIMS})", header.shape.len()),
        ));
    }
    let frame_bytes = header.payload_bytes.saturating_add((header_bytes + LENGTH_BYTES) as u64);
    if frame_bytes > max_frame_bytes {
        return Err(Error::FrameTooLarge { peer, length: frame_bytes, maximum: max_frame_bytes });
    }
    let expected = header
        .shape
        .iter()
        .try_fold(dtype.size() as u64, |bytes, &dim| bytes.checked_mul(dim))
        .ok_or_else(|| invalid(peer, "shape overflows".into()))?;
    if expected != header.payload_bytes {
        let reason =
            format!("payload of {} bytes for {dtype} {:?}", header.payload_bytes, header.shape);
        return Err(invalid(peer, reason));
    }
    // Every dimension is at most payload_bytes ≤ max_frame_bytes, so the casts are exact on 64-bit.
    let shape = Shape::new(header.shape.iter().map(|&dim| dim as usize).collect::<Vec<_>>());
    let tag = Tag { kind, sequence: header.sequence, step: header.step };
    Ok(Decoded {
        tag,
        meta: TensorMeta::new(shape, dtype),
        payload_bytes: header.payload_bytes as usize,
    })
}

fn dtype_code(dtype: DType) -> u8 {
    DType::ALL.iter().position(|&candidate| candidate == dtype).unwrap_or(0) as u8
}

fn invalid(peer: Rank, reason: String) -> Error {
    Error::InvalidFrame { peer, reason }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX: u64 = 1 << 20;

    fn frame(tag: Tag, meta: &TensorMeta) -> Vec<u8> {
        let mut bytes = encode_header(tag, meta).expect("header");
        bytes.extend(std::iter::repeat_n(7u8, meta.bytes()));
        bytes
    }

    #[test]
    fn frame_round_trips() {
        let tag = Tag { kind: MessageKind::AllGather, sequence: 42, step: 3 };
        let meta = TensorMeta::new([2, 3], DType::BF16);
        let bytes = frame(tag, &meta);
        let (decoded, payload) = decode_frame(&bytes, Rank(1), MAX).expect("valid frame");
        assert_eq!(decoded.tag, tag);
        assert_eq!(decoded.meta, meta);
        assert_eq!(payload, &[7u8; 12][..]);
    }

    #[test]
    fn oversized_and_inconsistent_frames_are_refused() {
        let tag = Tag { kind: MessageKind::Send, sequence: 0, step: 0 };
        let big = TensorMeta::new([1 << 20], DType::F32);
        let header = encode_header(tag, &big).expect("header");
        let error = decode_header(&header[LENGTH_BYTES..], Rank(2), MAX).expect_err("too large");
        assert!(matches!(error, Error::FrameTooLarge { peer: Rank(2), .. }), "{error}");
        let mut short = frame(tag, &TensorMeta::new([4], DType::F64));
        short.pop();
        assert!(matches!(decode_frame(&short, Rank(0), MAX), Err(Error::InvalidFrame { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Any outcome but a panic is fine; a success must be self-consistent.
            if let Ok((decoded, payload)) = decode_frame(&bytes, Rank(0), MAX) {
                prop_assert_eq!(decoded.meta.bytes(), payload.len());
            }
        }

        #[test]
        fn mutated_frames_never_panic_nor_exceed_the_maximum(
            dims in proptest::collection::vec(0usize..6, 0..4),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let tag = Tag { kind: MessageKind::AllReduce, sequence: 9, step: 1 };
            let mut bytes = frame(tag, &TensorMeta::new(dims, DType::F32));
            for (index, value) in flips {
                let at = index.index(bytes.len());
                bytes[at] ^= value;
            }
            if let Ok((decoded, payload)) = decode_frame(&bytes, Rank(0), MAX) {
                prop_assert!(decoded.payload_bytes as u64 <= MAX);
                prop_assert_eq!(decoded.meta.bytes(), payload.len());
            }
        }
    }
}
