//! Every collective, every dtype, groups of 1 to 5 members: device threads on shared buffers,
//! the in-process transport, and QUIC between threads that each own an endpoint.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use meshflow_comm::quic::{JobSecret, QuicConfig, QuicEndpoint, QuicTransport};
use meshflow_comm::{
    mesh_axis_group, Communicator, Error, InProcessTransport, Rank, ReduceOp, SharedGroup,
    Transport, TransportCommunicator,
};
use meshflow_ops::{DType, Tensor};

use common::{check_all_collectives, values, DTYPES};

const TIMEOUT: Duration = Duration::from_secs(20);

fn on_threads<C: Communicator + 'static>(members: Vec<C>, body: fn(&mut C)) {
    let handles: Vec<_> =
        members.into_iter().map(|mut member| thread::spawn(move || body(&mut member))).collect();
    handles.into_iter().for_each(|handle| handle.join().expect("member thread"));
}

fn ranks(size: usize) -> Vec<Rank> {
    (0..size).map(Rank).collect()
}

#[test]
fn shared_group_every_collective_every_dtype_sizes_one_to_five() {
    for size in 1..=5 {
        on_threads(SharedGroup::members(ranks(size), TIMEOUT), |member| {
            DTYPES.iter().for_each(|&dtype| check_all_collectives(member, dtype, true));
        });
    }
}

#[test]
fn shared_group_all_reduce_shares_one_output_and_broadcast_copies_nothing() {
    on_threads(SharedGroup::members(ranks(3), TIMEOUT), |member| {
        let mine = Tensor::from_vec(vec![member.group_index() as f32; 6], [6]).expect("tensor");
        let first = member.all_reduce(&mine, ReduceOp::Sum).expect("all_reduce");
        assert_eq!(values(&first), vec![3.0; 6]);
        let root = Tensor::from_vec(vec![9i64; 3], [3]).expect("tensor");
        let shared =
            member.broadcast((member.group_index() == 0).then_some(&root), 0).expect("broadcast");
        // Every member sees storage with more than one owner: nothing was copied.
        assert!(Arc::strong_count(shared.storage()) >= 2 || member.group_index() == 0);
        assert_eq!(shared.to_vec::<i64>().expect("i64"), vec![9; 3]);
    });
}

fn transport_members(size: usize, ring_threshold: usize) -> Vec<TransportCommunicator> {
    InProcessTransport::world(size, 4, TIMEOUT)
        .into_iter()
        .map(|transport| {
            let transport: Arc<dyn Transport> = Arc::new(transport);
            // Pieces of 16 bytes: every ring step travels in many uneven pieces.
            TransportCommunicator::world(transport)
                .expect("group")
                .with_small_message_bytes(ring_threshold)
                .with_piece_bytes(16)
        })
        .collect()
}

#[test]
fn in_process_transport_every_collective_every_dtype_sizes_one_to_five() {
    for size in 1..=5 {
        // Threshold 0 forces the ring algorithm even on small tensors; the default uses direct.
        for threshold in [0, 1 << 16] {
            on_threads(transport_members(size, threshold), |member| {
                DTYPES.iter().for_each(|&dtype| check_all_collectives(member, dtype, true));
            });
        }
    }
}

fn quic_mesh(size: usize, config: QuicConfig) -> Vec<QuicTransport> {
    let secret = JobSecret::generate().expect("secret");
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let endpoints: Vec<QuicEndpoint> = (0..size)
        .map(|rank| {
            QuicEndpoint::bind(loopback, Rank(rank), secret.clone(), config.clone()).expect("bind")
        })
        .collect();
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
fn quic_between_threads_every_collective_every_dtype_sizes_two_to_five() {
    for size in 2..=5 {
        let members = quic_mesh(size, QuicConfig::default().with_timeouts(TIMEOUT))
            .into_iter()
            .map(|transport| {
                let transport: Arc<dyn Transport> = Arc::new(transport);
                TransportCommunicator::world(transport)
                    .expect("group")
                    .with_small_message_bytes(1 << 10)
                    .with_piece_bytes(4 << 10)
            })
            .collect();
        on_threads(members, |member| {
            DTYPES
                .iter()
                .for_each(|&dtype| check_all_collectives(member, dtype, dtype == DType::BF16));
        });
    }
}

#[test]
fn two_dimensional_mesh_reduces_per_axis() {
    // A [2, 3] mesh: all-reduce along rows (axis 1), then along columns (axis 0) = global sum.
    let transports = InProcessTransport::world(6, 4, TIMEOUT);
    let handles: Vec<_> = transports
        .into_iter()
        .map(|transport| {
            thread::spawn(move || {
                let rank = transport.rank();
                let transport: Arc<dyn Transport> = Arc::new(transport);
                let row = mesh_axis_group(&[2, 3], rank, 1).expect("row");
                let column = mesh_axis_group(&[2, 3], rank, 0).expect("column");
                let mut rows =
                    TransportCommunicator::new(transport.clone(), row).expect("row group");
                let mut columns =
                    TransportCommunicator::new(transport, column).expect("column group");
                let mine = Tensor::from_vec(vec![rank.0 as f64; 5], [5]).expect("tensor");
                let partial = rows.all_reduce(&mine, ReduceOp::Sum).expect("row all_reduce");
                let row_sum = if rank.0 < 3 { 3.0 } else { 12.0 };
                assert_eq!(partial.to_vec::<f64>().expect("f64"), vec![row_sum; 5]);
                let total = columns.all_reduce(&partial, ReduceOp::Sum).expect("column all_reduce");
                assert_eq!(total.to_vec::<f64>().expect("f64"), vec![15.0; 5]);
            })
        })
        .collect();
    handles.into_iter().for_each(|handle| handle.join().expect("rank"));
}

#[test]
fn mismatched_collectives_are_reported_with_both_sequence_numbers() {
    on_threads(transport_members(2, 0), |member| {
        let mine = Tensor::from_vec(vec![1.0f32; 4], [4]).expect("tensor");
        let error = if member.group_index() == 0 {
            member.all_reduce(&mine, ReduceOp::Sum).expect_err("mismatch")
        } else {
            member.all_gather(&mine).expect_err("mismatch")
        };
        match error {
            Error::SequenceMismatch { collective, peer, expected, received, .. } => {
                assert_eq!(peer, Rank(1 - member.group_index()));
                assert_eq!((expected, received), (0, 0));
                assert!(collective == "all_reduce" || collective == "all_gather");
            }
            other => panic!("expected a sequence mismatch, got {other}"),
        }
    });
    on_threads(SharedGroup::members(ranks(3), TIMEOUT), |member| {
        let mine = Tensor::from_vec(vec![1.0f32; 3], [3]).expect("tensor");
        let result = match member.group_index() {
            2 => member.all_gather(&mine),
            _ => member.all_reduce(&mine, ReduceOp::Sum),
        };
        let error = result.expect_err("mismatch");
        assert!(
            matches!(error, Error::SequenceMismatch { expected: 0, received: 0, .. }),
            "{error}"
        );
    });
}

#[test]
fn a_member_that_never_arrives_times_out_naming_it() {
    let mut members = SharedGroup::members(ranks(3), Duration::from_millis(300));
    let absent = members.pop().expect("three members");
    let started = Instant::now();
    on_threads(members, |member| {
        let mine = Tensor::from_vec(vec![1.0f32; 3], [3]).expect("tensor");
        let error = member.all_reduce(&mine, ReduceOp::Sum).expect_err("member 2 is absent");
        assert!(matches!(error, Error::Timeout { peer: Rank(2), .. }), "{error}");
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(absent);
    let unsupported = Tensor::from_vec(vec![1u8; 3], [3]).expect("tensor");
    let mut single = SharedGroup::members(ranks(1), TIMEOUT);
    let error = single[0].all_reduce(&unsupported, ReduceOp::Sum).expect_err("u8 sum");
    assert!(matches!(error, Error::UnsupportedDType { collective: "all_reduce", .. }), "{error}");
}
