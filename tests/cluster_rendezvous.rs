//! The rendezvous in one process over in-process links: world, store, barrier, join timeout,
//! heartbeat failure detection, and links that misbehave.

use std::time::{Duration, Instant};

use meshflow::comm::cluster::wire::{self, ClientMessage, PROTOCOL_VERSION};
use meshflow::comm::cluster::{ClusterConfig, ClusterError, Link, Member, MemberInfo, Rendezvous};
use tokio::io::AsyncWriteExt;

fn config() -> ClusterConfig {
    ClusterConfig {
        join_timeout: Duration::from_millis(800),
        heartbeat_interval: Duration::from_millis(50),
        failure_timeout: Duration::from_millis(400),
    }
}

fn info(rank: u32) -> MemberInfo {
    MemberInfo { rank, data_addr: format!("127.0.0.1:{}", 7000 + rank), devices: 2 }
}

async fn link(rendezvous: &Rendezvous) -> Link {
    let (near, far) = Link::pair();
    assert!(rendezvous.accept(far).await);
    near
}

async fn join_all(rendezvous: &Rendezvous, size: u32) -> Vec<Member> {
    let mut joins = Vec::new();
    for rank in 0..size {
        let link = link(rendezvous).await;
        let size = size as usize;
        joins.push(tokio::spawn(
            async move { Member::join(link, info(rank), size, &config()).await },
        ));
    }
    let mut members = Vec::new();
    for join in joins {
        members.push(join.await.expect("task").expect("join"));
    }
    members
}

#[tokio::test]
async fn members_learn_the_world_and_share_a_store_and_barriers() {
    let rendezvous = Rendezvous::start(3, config());
    let members = join_all(&rendezvous, 3).await;
    assert_eq!(members[2].members(), &[info(0), info(1), info(2)]);
    let waiting = members[1].get("nccl-id");
    members[0].set("nccl-id", b"0123").expect("set");
    assert_eq!(waiting.await.expect("get"), b"0123");
    assert_eq!(members[2].get("nccl-id").await.expect("get"), b"0123");
    let (first, second, third) =
        tokio::join!(members[0].barrier("b"), members[1].barrier("b"), members[2].barrier("b"));
    assert!(first.is_ok() && second.is_ok() && third.is_ok());
    let big = vec![0u8; wire::MAX_VALUE_BYTES + 1];
    assert!(matches!(members[0].set("big", &big), Err(ClusterError::TooLarge { .. })));
}

#[tokio::test]
async fn a_join_that_does_not_complete_names_the_missing_ranks() {
    let rendezvous = Rendezvous::start(4, config());
    let first = link(&rendezvous).await;
    let third = link(&rendezvous).await;
    let config = config();
    let (first, third) = tokio::join!(
        Member::join(first, info(0), 4, &config),
        Member::join(third, info(2), 4, &config)
    );
    for result in [first, third] {
        match result {
            Err(ClusterError::JoinTimedOut { missing, .. }) => assert_eq!(missing, vec![1, 3]),
            other => panic!("expected JoinTimedOut, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_silent_member_is_named_in_pending_and_future_operations() {
    let rendezvous = Rendezvous::start(3, config());
    let mut joins = Vec::new();
    for rank in 0..2 {
        let link = link(&rendezvous).await;
        joins.push(tokio::spawn(async move { Member::join(link, info(rank), 3, &config()).await }));
    }
    // Rank 2 joins by hand and then says nothing more, like a stopped process.
    let mut silent = link(&rendezvous).await;
    let join = ClientMessage::Join { version: PROTOCOL_VERSION, world_size: 3, member: info(2) };
    wire::write_frame(&mut silent.writer, &join).await.expect("join frame");
    let mut members = Vec::new();
    for join in joins {
        members.push(join.await.expect("task").expect("join"));
    }
    let started = Instant::now();
    let pending = members[0].get("never-set").await;
    let waited = started.elapsed();
    assert!(
        matches!(&pending, Err(ClusterError::PeerFailed { rank: 2, reason }) if reason.contains("no heartbeat"))
    );
    eprintln!("silent member detected after {waited:?} (failure_timeout 400 ms, heartbeat 50 ms)");
    assert!(matches!(members[1].barrier("b").await, Err(ClusterError::PeerFailed { rank: 2, .. })));
    assert!(matches!(members[1].set("k", b"v"), Err(ClusterError::PeerFailed { rank: 2, .. })));
    assert_eq!(members[0].health().failure().map(|failure| failure.rank), Some(2));
}

#[tokio::test]
async fn garbage_duplicates_and_wrong_worlds_are_refused_and_the_job_goes_on() {
    let rendezvous = Rendezvous::start(2, config());
    let mut garbage = link(&rendezvous).await;
    garbage.writer.write_all(&[0xff; 64]).await.expect("garbage");
    let mut huge = link(&rendezvous).await;
    huge.writer.write_all(&u32::MAX.to_le_bytes()).await.expect("length");
    let first = link(&rendezvous).await;
    let member = tokio::spawn(async move { Member::join(first, info(0), 2, &config()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let wrong_world = Member::join(link(&rendezvous).await, info(1), 3, &config()).await;
    assert!(matches!(wrong_world, Err(ClusterError::Refused { rank: 1, .. })));
    let duplicate = Member::join(link(&rendezvous).await, info(0), 2, &config()).await;
    assert!(matches!(duplicate, Err(ClusterError::Refused { rank: 0, .. })));
    let second = Member::join(link(&rendezvous).await, info(1), 2, &config()).await.expect("join");
    let first = member.await.expect("task").expect("join");
    assert_eq!(first.members().len(), 2);
    second.set("after", b"garbage").expect("set");
    assert_eq!(first.get("after").await.expect("get"), b"garbage");
}
