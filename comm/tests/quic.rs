//! The QUIC endpoint: authentication bound to the TLS session, and the transport over it.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use meshflow_comm::quic::{JobSecret, QuicConfig, QuicEndpoint, QuicTransport};
use meshflow_comm::{Channel, Error, Message, MessageKind, Rank, Tag, Transport};
use meshflow_ops::Tensor;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn config() -> QuicConfig {
    QuicConfig::default().with_timeouts(Duration::from_secs(60))
}

fn endpoint(rank: usize, secret: &JobSecret) -> QuicEndpoint {
    QuicEndpoint::bind(loopback(), Rank(rank), secret.clone(), config()).expect("bind")
}

#[test]
fn authenticated_peers_learn_each_others_rank_and_share_streams() {
    let secret = JobSecret::generate().expect("secret");
    let server = endpoint(0, &secret);
    let client = endpoint(5, &secret);
    let address = server.local_address().expect("address");
    let accepting = server.clone();
    let accepted = thread::spawn(move || {
        accepting.block_on(async {
            let connection = accepting.accept().await?;
            let (mut send, mut receive) =
                connection.connection().accept_bi().await.expect("bi stream");
            let request = receive.read_to_end(64).await.expect("request");
            send.write_all(&request).await.expect("echo");
            send.finish().expect("finish");
            // Keep the connection open until the client has read the echo.
            let _ = send.stopped().await;
            Ok::<_, Error>(connection.peer_rank())
        })
    });
    let echoed = client.block_on(async {
        let connection = client.connect(address).await?;
        assert_eq!(connection.peer_rank(), Rank(0));
        let (mut send, mut receive) = connection.connection().open_bi().await.expect("open");
        send.write_all(b"heartbeat").await.expect("write");
        send.finish().expect("finish");
        let reply = receive.read_to_end(64).await.expect("reply");
        Ok::<_, Error>(reply)
    });
    assert_eq!(echoed.expect("client"), b"heartbeat");
    assert_eq!(accepted.join().expect("server thread").expect("server"), Rank(5));
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused_on_both_sides() {
    let server = endpoint(0, &JobSecret::generate().expect("secret"));
    let stranger = endpoint(1, &JobSecret::generate().expect("secret"));
    let address = server.local_address().expect("address");
    let accepting = server.clone();
    let accepted = thread::spawn(move || accepting.block_on(accepting.accept()));
    let dialed = stranger.block_on(stranger.connect(address));
    assert!(matches!(dialed, Err(Error::Authentication { .. })), "{dialed:?}");
    let accepted = accepted.join().expect("thread");
    assert!(matches!(accepted, Err(Error::Authentication { .. })), "{accepted:?}");
}

fn mesh(world_size: usize) -> Vec<QuicTransport> {
    let secret = JobSecret::generate().expect("secret");
    let endpoints: Vec<QuicEndpoint> =
        (0..world_size).map(|rank| endpoint(rank, &secret)).collect();
    let addresses: Vec<SocketAddr> =
        endpoints.iter().map(|e| e.local_address().expect("address")).collect();
    let handles: Vec<_> = endpoints
        .into_iter()
        .map(|endpoint| {
            let addresses = addresses.clone();
            thread::spawn(move || QuicTransport::connect_mesh(endpoint, &addresses))
        })
        .collect();
    handles.into_iter().map(|handle| handle.join().expect("thread").expect("mesh")).collect()
}

#[test]
fn quic_transport_exchanges_large_tensors_both_ways() {
    let world = mesh(3);
    let count = 3 << 20; // 12 MiB of f32 each way, below one stream window
    let handles: Vec<_> = world
        .into_iter()
        .map(|transport| {
            thread::spawn(move || {
                let me = transport.rank().0;
                let tensor = Tensor::from_vec(vec![me as f32; count], [count]).expect("tensor");
                let tag = Tag { kind: MessageKind::Send, sequence: me as u64, step: 0 };
                let sends = (0..3)
                    .filter(|&p| p != me)
                    .map(|p| (Rank(p), Message { tag, tensor: tensor.clone() }))
                    .collect();
                let peers: Vec<Rank> = (0..3).filter(|&p| p != me).map(Rank).collect();
                let received = transport.exchange(Channel(7), sends, &peers).expect("exchange");
                for (peer, message) in peers.iter().zip(received) {
                    assert_eq!(message.tag.sequence, peer.0 as u64);
                    let values = message.tensor.to_vec::<f32>().expect("f32");
                    assert_eq!(values.len(), count);
                    assert!(values.iter().all(|&v| v == peer.0 as f32));
                    assert_path_healthy(&transport, *peer);
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|handle| handle.join().expect("rank thread"));
}

/// The stall this guards against: quinn batched 10 datagrams of the discovered (loopback, ~64 KiB)
/// MTU into one segmentation-offload send, Linux refused each batch (more than 64 KiB), quinn
/// dropped it silently, and the connection crawled through loss recovery until black-hole
/// detection set the MTU back to 1200 — 10 s for 12 MiB. A healthy path detects no black hole
/// and keeps a discovered MTU above Ethernet's.
fn assert_path_healthy(transport: &QuicTransport, peer: Rank) {
    let stats = transport.stats(peer).expect("stats");
    assert_eq!(stats.path.black_holes_detected, 0, "path to {peer}: {:?}", stats.path);
    assert!(stats.path.current_mtu > 1500, "path to {peer}: {:?}", stats.path);
}

#[test]
fn sequential_sends_arrive_even_when_both_sides_exit_at_once() {
    let world = mesh(2);
    let handles: Vec<_> = world
        .into_iter()
        .map(|transport| {
            thread::spawn(move || {
                let me = transport.rank().0;
                for round in 0..3u64 {
                    let tensor = Tensor::from_vec(vec![me as f32; 4], [4]).expect("tensor");
                    let tag = Tag { kind: MessageKind::Send, sequence: round, step: 0 };
                    transport
                        .send(Rank(1 - me), Channel(0x8000_0001), Message { tag, tensor })
                        .expect("send");
                    let got = transport.recv(Rank(1 - me), Channel(0x8000_0001)).expect("recv");
                    assert_eq!(got.tag.sequence, round);
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|handle| handle.join().expect("rank thread"));
}
