//! Job authentication bound to the TLS session.
//!
//! Right after the QUIC handshake both sides export 32 bytes of keying material from the TLS
//! session (RFC 5705 / 8446 exporter) and prove knowledge of the job secret with
//! `HMAC-SHA256(secret, role || keying material || rank)`. The dialer opens one bidirectional
//! stream and sends its hello; the acceptor verifies it (constant time) before it reads or accepts
//! anything else on the connection, then answers with its own hello, which the dialer verifies.
//! A peer that fails is closed with [`AUTH_FAILED`]. The keying material differs in every TLS
//! session, so a tag is useless on any other connection.

use quinn::{Connection, RecvStream, VarInt};

use super::JobSecret;
use crate::{Error, Rank, Result};

/// QUIC application close code sent to a peer that failed authentication.
pub const AUTH_FAILED: u32 = 0x4d46_0001;
const MAGIC: &[u8; 4] = b"MFAU";
const AUTH_VERSION: u16 = 1;
const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshflow-job-authentication-v1";
const TAG_BYTES: usize = 32;
const HELLO_BYTES: usize = 4 + 2 + 4 + TAG_BYTES;

/// Which side of the connection a hello comes from (part of the MAC, so tags cannot be reflected).
#[derive(Clone, Copy)]
enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"meshflow dialer",
            Role::Acceptor => b"meshflow acceptor",
        }
    }
}

/// Authenticates the connection this side dialed; returns the peer's rank.
pub(crate) async fn dialer(
    connection: &Connection,
    secret: &JobSecret,
    rank: Rank,
) -> Result<Rank> {
    let keying = keying_material(connection)?;
    let (mut send, mut receive) =
        connection.open_bi().await.map_err(|error| fail(connection, error))?;
    let hello = hello(secret, &keying, Role::Dialer, rank)?;
    send.write_all(&hello).await.map_err(|error| fail(connection, error))?;
    send.finish().map_err(|error| fail(connection, error))?;
    let reply = read_hello(connection, &mut receive).await?;
    verify(connection, secret, &keying, Role::Acceptor, &reply)
}

/// Authenticates a connection this side accepted; returns the peer's rank.
pub(crate) async fn acceptor(
    connection: &Connection,
    secret: &JobSecret,
    rank: Rank,
) -> Result<Rank> {
    let keying = keying_material(connection)?;
    let (mut send, mut receive) =
        connection.accept_bi().await.map_err(|error| fail(connection, error))?;
    let request = read_hello(connection, &mut receive).await?;
    let peer = verify(connection, secret, &keying, Role::Dialer, &request)?;
    let hello = hello(secret, &keying, Role::Acceptor, rank)?;
    send.write_all(&hello).await.map_err(|error| fail(connection, error))?;
    send.finish().map_err(|error| fail(connection, error))?;
    Ok(peer)
}

fn keying_material(connection: &Connection) -> Result<[u8; 32]> {
    let mut keying = [0u8; 32];
    connection
        .export_keying_material(&mut keying, EXPORTER_LABEL, b"")
        .map_err(|_| refuse(connection, "the TLS session cannot export keying material".into()))?;
    Ok(keying)
}

fn mac_input(keying: &[u8; 32], role: Role, rank: u32) -> Vec<u8> {
    [role.label(), &keying[..], &rank.to_le_bytes()].concat()
}

fn hello(secret: &JobSecret, keying: &[u8; 32], role: Role, rank: Rank) -> Result<Vec<u8>> {
    let rank = u32::try_from(rank.0)
        .map_err(|_| Error::Setup { reason: format!("rank {rank} does not fit in 32 bits") })?;
    let tag = ring::hmac::sign(&secret.hmac_key(), &mac_input(keying, role, rank));
    Ok([&MAGIC[..], &AUTH_VERSION.to_le_bytes(), &rank.to_le_bytes(), tag.as_ref()].concat())
}

async fn read_hello(
    connection: &Connection,
    receive: &mut RecvStream,
) -> Result<[u8; HELLO_BYTES]> {
    let mut hello = [0u8; HELLO_BYTES];
    receive.read_exact(&mut hello).await.map_err(|error| fail(connection, error))?;
    Ok(hello)
}

/// Checks a peer's hello; closes the connection when it does not prove the secret.
fn verify(
    connection: &Connection,
    secret: &JobSecret,
    keying: &[u8; 32],
    role: Role,
    hello: &[u8; HELLO_BYTES],
) -> Result<Rank> {
    let (magic, rest) = hello.split_at(4);
    let (version, rest) = rest.split_at(2);
    let (rank, tag) = rest.split_at(4);
    if magic != MAGIC || version != AUTH_VERSION.to_le_bytes() {
        return Err(refuse(connection, "not a meshflow authentication hello".into()));
    }
    let mut rank_bytes = [0u8; 4];
    rank_bytes.copy_from_slice(rank);
    let rank = u32::from_le_bytes(rank_bytes);
    ring::hmac::verify(&secret.hmac_key(), &mac_input(keying, role, rank), tag)
        .map_err(|_| refuse(connection, "the peer does not hold the job secret".into()))?;
    Ok(Rank(rank as usize))
}

fn refuse(connection: &Connection, reason: String) -> Error {
    connection.close(VarInt::from_u32(AUTH_FAILED), b"authentication failed");
    Error::Authentication { address: connection.remote_address(), reason }
}

fn fail(connection: &Connection, error: impl std::fmt::Display) -> Error {
    refuse(connection, format!("authentication exchange failed: {error}"))
}
