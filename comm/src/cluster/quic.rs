//! The rendezvous over authenticated QUIC: rank 0 accepts on its own endpoint at
//! `MASTER_ADDR:MASTER_PORT`; members and launchers dial it from theirs. Every link is a
//! bidirectional stream of a connection that passed job authentication, so a process without the
//! secret never reaches the rendezvous code.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::quic::{AuthenticatedConnection, QuicEndpoint};

use super::{ClusterConfig, ClusterError, Link, Member, MemberInfo, Rendezvous};

/// Pause between attempts to reach a rendezvous that is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Serves a rendezvous for `world_size` ranks on `endpoint` (rank 0's, bound at the master
/// address). Connections that fail authentication are dropped and the job goes on.
///
/// [`RENDEZVOUS_ACCEPTORS`] tasks accept side by side, and each authenticated connection gets its link in a
/// task of its own, every step bounded by the endpoint's handshake timeout: a client that connects
/// and then stalls holds one acceptor for at most that long, and the others keep admitting ranks.
/// Must be called inside the endpoint's runtime.
pub fn serve_over_quic(
    endpoint: QuicEndpoint,
    world_size: usize,
    config: ClusterConfig,
) -> Rendezvous {
    let rendezvous = Rendezvous::start(world_size, config);
    for _ in 0..RENDEZVOUS_ACCEPTORS {
        tokio::spawn(accept_loop(endpoint.clone(), rendezvous.acceptor()));
    }
    rendezvous
}

/// Handshakes the rendezvous runs at once: the most stalled clients it can outlast without
/// delaying a join (each is dropped after the handshake timeout).
pub const RENDEZVOUS_ACCEPTORS: usize = 16;

/// Accepts and authenticates connections one after the other, handing each to its own task.
async fn accept_loop(endpoint: QuicEndpoint, acceptor: mpsc::Sender<Link>) {
    let limit = endpoint.config().handshake_timeout;
    loop {
        let connection = match endpoint.accept().await {
            Ok(connection) => connection,
            Err(crate::Error::EndpointClosed) => return,
            // Refused or failed handshakes: the stranger is gone, the job goes on.
            Err(_) => continue,
        };
        if acceptor.is_closed() {
            return;
        }
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(Some(link)) = tokio::time::timeout(limit, accept_link(connection)).await {
                let _ = acceptor.send(link).await;
            }
        });
    }
}

async fn accept_link(connection: AuthenticatedConnection) -> Option<Link> {
    let (send, receive) = connection.connection().accept_bi().await.ok()?;
    let mut link = Link::new(receive, send, connection.remote_address().to_string());
    link.proven_rank = Some(connection.peer_rank().0);
    link.guard = Some(Box::new(connection));
    Some(link)
}

/// Dials the rendezvous (retrying until `config.join_timeout`, since rank 0 may start later) and
/// joins it as `me`.
pub async fn join_over_quic(
    endpoint: &QuicEndpoint,
    rendezvous: SocketAddr,
    me: MemberInfo,
    world_size: usize,
    config: &ClusterConfig,
) -> Result<Member, ClusterError> {
    let deadline = Instant::now() + config.join_timeout;
    let link = dial(endpoint, rendezvous, deadline).await?;
    Member::join(link, me, world_size, config).await
}

/// Tells the rendezvous that `rank` failed, trying until `timeout`.
pub async fn report_over_quic(
    endpoint: &QuicEndpoint,
    rendezvous: SocketAddr,
    rank: usize,
    reason: &str,
    timeout: Duration,
) -> Result<(), ClusterError> {
    let link = dial(endpoint, rendezvous, Instant::now() + timeout).await?;
    let connection = link
        .guard
        .as_ref()
        .and_then(|guard| guard.downcast_ref::<AuthenticatedConnection>())
        .cloned();
    super::report_failure(link, rank, reason).await?;
    // Keep the connection until the rendezvous has read the report and closed its side.
    if let Some(connection) = connection {
        let _ = tokio::time::timeout(timeout, connection.connection().closed()).await;
    }
    Ok(())
}

async fn dial(
    endpoint: &QuicEndpoint,
    rendezvous: SocketAddr,
    deadline: Instant,
) -> Result<Link, ClusterError> {
    loop {
        let failure = match endpoint.connect(rendezvous).await {
            Ok(connection) => match connection.connection().open_bi().await {
                Ok((send, receive)) => {
                    let mut link = Link::new(receive, send, rendezvous.to_string());
                    link.proven_rank = Some(connection.peer_rank().0);
                    link.guard = Some(Box::new(connection));
                    return Ok(link);
                }
                Err(error) => error.to_string(),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() + RETRY_PAUSE > deadline {
            return Err(ClusterError::Unreachable {
                peer: rendezvous.to_string(),
                reason: format!("rank 0 never answered: {failure}"),
            });
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
