//! Rendezvous messages and their framing: a little-endian `u32` length, then the message archived
//! with rkyv. A frame longer than [`MAX_FRAME_BYTES`] is refused before any of it is buffered, and
//! every frame is validated (bytecheck) before it is deserialised, so no peer input can panic or
//! allocate without bound.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version carried by every join; a mismatch is refused with both versions named.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// The largest key-value store value (leaves room for the rest of a frame).
pub const MAX_VALUE_BYTES: usize = MAX_FRAME_BYTES - 4096;
/// The longest key, barrier name, address or reason.
pub const MAX_TEXT_BYTES: usize = 1024;
/// The largest world a rendezvous accepts.
pub const MAX_WORLD_SIZE: u32 = 1 << 16;

pub use messages::{ClientMessage, MemberInfo, ServerMessage};

/// The message types. rkyv derives archived twins whose variant fields carry no docs; the lint
/// is silenced for them only (every type and field here is documented).
#[allow(missing_docs)]
mod messages {
    /// One process of the world, as every rank learns it.
    #[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub struct MemberInfo {
        /// Global rank.
        pub rank: u32,
        /// Where this rank accepts data connections (`host:port`), as it announced.
        pub data_addr: String,
        /// Number of devices this rank drives.
        pub devices: u32,
    }

    /// What a worker (or a launcher) sends to the rendezvous.
    #[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub enum ClientMessage {
        /// First message of a worker: who it is.
        Join {
            /// [`PROTOCOL_VERSION`](crate::frame::PROTOCOL_VERSION) of the sender.
            version: u32,
            /// The world size the sender was launched with.
            world_size: u32,
            /// The sender's description.
            member: MemberInfo,
        },
        /// First and only message of a launcher that saw one of its workers fail.
        Report {
            /// The rank that failed.
            rank: u32,
            /// How it failed (exit status or signal).
            reason: String,
        },
        /// Store `value` under `key` (replacing an older value).
        Set {
            /// The key.
            key: String,
            /// The value.
            value: Vec<u8>,
        },
        /// Answer `request` with the value of `key` once it is set.
        Get {
            /// The sender's request number.
            request: u64,
            /// The key.
            key: String,
        },
        /// Answer `request` once every rank has entered the barrier `name`.
        Barrier {
            /// The sender's request number.
            request: u64,
            /// The barrier's name.
            name: String,
        },
        /// I am alive.
        Heartbeat,
        /// I am done and leave in order; my silence from now on is no failure.
        Leave,
    }

    /// What the rendezvous sends to a worker.
    #[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub enum ServerMessage {
        /// Every rank has joined: the world, ordered by rank.
        Welcome {
            /// All members.
            members: Vec<MemberInfo>,
        },
        /// The join was refused.
        Refused {
            /// Why.
            reason: String,
        },
        /// The join did not complete in time.
        JoinTimedOut {
            /// Ranks that never arrived.
            missing: Vec<u32>,
        },
        /// The answer to a `Get`.
        Value {
            /// The request answered.
            request: u64,
            /// The value.
            value: Vec<u8>,
        },
        /// The answer to a `Barrier`.
        BarrierDone {
            /// The request answered.
            request: u64,
        },
        /// The rendezvous is alive.
        Heartbeat,
        /// The answer to `Leave`: the rendezvous has recorded the departure.
        Farewell,
        /// A rank failed; the job cannot go on.
        PeerFailed {
            /// The rank.
            rank: u32,
            /// How it was noticed.
            reason: String,
        },
    }
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds the bound.
    #[error("frame of {length} bytes exceeds the maximum of {MAX_FRAME_BYTES}")]
    TooLarge {
        /// The announced length.
        length: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Writes one message as a frame.
pub async fn write_frame<W, M>(writer: &mut W, message: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let bytes = rkyv::to_bytes::<rancor::Error>(message)
        .map_err(|error| FrameError::Malformed(error.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { length: bytes.len() });
    }
    let length =
        u32::try_from(bytes.len()).map_err(|_| FrameError::TooLarge { length: bytes.len() })?;
    writer.write_all(&length.to_le_bytes()).await?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame's bytes (bounded), aligned for rkyv.
pub async fn read_frame_bytes<R>(reader: &mut R) -> Result<AlignedVec, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; 4];
    reader.read_exact(&mut prefix).await?;
    let length = u32::from_le_bytes(prefix) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { length });
    }
    let mut bytes = AlignedVec::with_capacity(length);
    bytes.resize(length, 0);
    reader.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// Validates and decodes a client message, then checks its bounds.
pub fn decode_client(bytes: &[u8]) -> Result<ClientMessage, FrameError> {
    let message = rkyv::from_bytes::<ClientMessage, rancor::Error>(bytes)
        .map_err(|error| FrameError::Malformed(error.to_string()))?;
    check_client(&message)?;
    Ok(message)
}

/// Validates and decodes a server message.
pub fn decode_server(bytes: &[u8]) -> Result<ServerMessage, FrameError> {
    rkyv::from_bytes::<ServerMessage, rancor::Error>(bytes)
        .map_err(|error| FrameError::Malformed(error.to_string()))
}

/// Reads and decodes one client message.
pub async fn read_client<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<ClientMessage, FrameError> {
    decode_client(&read_frame_bytes(reader).await?)
}

/// Reads and decodes one server message.
pub async fn read_server<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<ServerMessage, FrameError> {
    decode_server(&read_frame_bytes(reader).await?)
}

fn check_client(message: &ClientMessage) -> Result<(), FrameError> {
    let texts: Vec<&str> = match message {
        ClientMessage::Join { member, .. } => vec![&member.data_addr],
        ClientMessage::Report { reason, .. } => vec![reason],
        ClientMessage::Set { key, .. } | ClientMessage::Get { key, .. } => vec![key],
        ClientMessage::Barrier { name, .. } => vec![name],
        ClientMessage::Heartbeat | ClientMessage::Leave => vec![],
    };
    if let Some(text) = texts.iter().find(|text| text.len() > MAX_TEXT_BYTES) {
        return Err(FrameError::Malformed(format!(
            "text of {} bytes exceeds {MAX_TEXT_BYTES}",
            text.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClientMessage {
        ClientMessage::Join {
            version: PROTOCOL_VERSION,
            world_size: 4,
            member: MemberInfo { rank: 3, data_addr: "10.0.0.4:7000".to_string(), devices: 2 },
        }
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &sample()).await.unwrap();
        write_frame(&mut buffer, &ServerMessage::BarrierDone { request: 9 }).await.unwrap();
        let mut reader = &buffer[..];
        assert_eq!(read_client(&mut reader).await.unwrap(), sample());
        assert_eq!(
            read_server(&mut reader).await.unwrap(),
            ServerMessage::BarrierDone { request: 9 }
        );
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_before_reading() {
        let mut bytes = (u32::MAX).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let error = read_client(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { length } if length == u32::MAX as usize));
    }

    #[test]
    fn long_keys_are_refused() {
        let message = ClientMessage::Get { request: 1, key: "k".repeat(MAX_TEXT_BYTES + 1) };
        let bytes = rkyv::to_bytes::<rancor::Error>(&message).unwrap();
        assert!(matches!(decode_client(&bytes), Err(FrameError::Malformed(_))));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn random_and_mutated_frames_never_panic(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            flips in proptest::collection::vec((0usize..512, proptest::prelude::any::<u8>()), 0..8),
        ) {
            let _ = decode_client(&noise);
            let _ = decode_server(&noise);
            let mut valid = rkyv::to_bytes::<rancor::Error>(&sample()).unwrap().to_vec();
            for (index, byte) in flips {
                let length = valid.len();
                valid[index % length] ^= byte;
            }
            let mut aligned = AlignedVec::<16>::new();
            aligned.extend_from_slice(&valid);
            let _ = decode_client(&aligned);
        }
    }
}
