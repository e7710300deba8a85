//! The transport of a session whose job's processes each drive several devices: device ranks
//! are numbered process by process; a message to a device of this process goes through shared
//! memory, one to a device of another process over the job's (health-watched QUIC) data plane,
//! on a channel of its own per (sender device, receiver device), so the devices of two processes
//! share one connection without reading each other's messages.

use std::sync::Arc;
use std::time::Duration;

use meshflow_comm::{
    deliver, Arrived, Channel, Delivery, Error, InProcessTransport, Message, Piece, Rank, Result,
    Tag, Transport,
};
use meshflow_ops::{Tensor, TensorMeta};

/// One device's view of a world of devices spread over processes.
pub struct DeviceTransport {
    /// This device's rank.
    pub rank: usize,
    /// Per device rank, the process that drives it.
    pub process_of: Arc<Vec<usize>>,
    /// Between the devices of this process (device ranks).
    pub local: InProcessTransport,
    /// Between processes (process ranks).
    pub remote: Arc<dyn Transport>,
}

impl DeviceTransport {
    fn process(&self, device: Rank) -> usize {
        self.process_of.get(device.0).copied().unwrap_or(usize::MAX)
    }

    fn is_local(&self, device: Rank) -> bool {
        self.process(device) == self.process(Rank(self.rank))
    }

    /// The channel of the processes' connection that carries `channel` from device `from` to
    /// device `to`.
    fn channel(channel: Channel, from: Rank, to: Rank) -> Channel {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for word in [u64::from(channel.0), from.0 as u64, to.0 as u64] {
            hash ^= word;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Channel((hash ^ (hash >> 32)) as u32)
    }

    /// Sends `sends` on a helper thread while `receive` runs here, so two devices that exchange
    /// over a flow-controlled connection cannot block each other.
    fn overlapped<T>(
        &self,
        sends: Vec<(Rank, Channel, Message)>,
        receive: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        std::thread::scope(|scope| {
            let sending = scope.spawn(move || {
                sends.into_iter().try_for_each(|(peer, channel, m)| self.send(peer, channel, m))
            });
            let received = receive();
            let sent = sending.join().unwrap_or_else(|_| {
                Err(meshflow_comm::Error::InvalidArgument {
                    collective: "send",
                    reason: "the sending thread panicked".into(),
                })
            });
            sent.and(received)
        })
    }

    /// An exchange whose peers are all in other processes, as one stream exchange on the
    /// process transport (for QUIC: sends and receives on the calling thread), its messages
    /// rebuilt from the deliveries. The thread that [`DeviceTransport::overlapped`] starts per
    /// call cost ~60 µs per small all-reduce between 2 processes on loopback (issue 9).
    fn remote_messages(
        &self,
        sends: Vec<(Channel, Piece)>,
        receives: &[(Rank, Channel)],
    ) -> Result<Vec<Message>> {
        let mut parts: Vec<Option<(Tag, TensorMeta, Vec<u8>)>> = vec![None; receives.len()];
        self.stream_exchange(sends, receives, &mut |index, delivery| {
            match (delivery, parts.get_mut(index)) {
                (Delivery::Header { tag, meta }, Some(part)) => {
                    *part = Some((tag, meta.clone(), Vec::with_capacity(meta.bytes())));
                }
                (Delivery::Payload(bytes), Some(Some((_, _, buffer)))) => {
                    buffer.extend_from_slice(bytes);
                }
                _ => {}
            }
            Ok(())
        })?;
        parts
            .into_iter()
            .zip(receives)
            .map(|(part, &(peer, _))| {
                let (tag, meta, bytes) = part.ok_or_else(|| Error::PeerClosed {
                    peer,
                    operation: "exchange".into(),
                    reason: "no message arrived".into(),
                })?;
                let tensor = Tensor::from_bytes(&bytes, meta.shape, meta.dtype)?;
                Ok(Message { tag, tensor })
            })
            .collect()
    }
}

impl Transport for DeviceTransport {
    fn rank(&self) -> Rank {
        Rank(self.rank)
    }

    fn world_size(&self) -> usize {
        self.process_of.len()
    }

    fn timeout(&self) -> Duration {
        self.local.timeout().max(self.remote.timeout())
    }

    fn send(&self, peer: Rank, channel: Channel, message: Message) -> Result<()> {
        if self.is_local(peer) {
            return self.local.send(peer, channel, message);
        }
        let wire = Self::channel(channel, Rank(self.rank), peer);
        self.remote.send(Rank(self.process(peer)), wire, message)
    }

    fn recv(&self, peer: Rank, channel: Channel) -> Result<Message> {
        if self.is_local(peer) {
            return self.local.recv(peer, channel);
        }
        let wire = Self::channel(channel, peer, Rank(self.rank));
        self.remote.recv(Rank(self.process(peer)), wire)
    }

    fn exchange(
        &self,
        channel: Channel,
        sends: Vec<(Rank, Message)>,
        receives: &[Rank],
    ) -> Result<Vec<Message>> {
        let remote = |peer: &Rank| !self.is_local(*peer);
        if sends.iter().all(|(peer, _)| remote(peer)) && receives.iter().all(remote) {
            let sends = sends
                .into_iter()
                .map(|(peer, message)| (channel, Piece::whole(peer, message.tag, message.tensor)))
                .collect();
            let receives: Vec<(Rank, Channel)> =
                receives.iter().map(|&peer| (peer, channel)).collect();
            return self.remote_messages(sends, &receives);
        }
        let sends = sends.into_iter().map(|(peer, message)| (peer, channel, message)).collect();
        self.overlapped(sends, || receives.iter().map(|&peer| self.recv(peer, channel)).collect())
    }

    /// A ring step whose peers are all in this process runs on shared memory, one whose peers
    /// are all in other processes goes to the process transport's own `stream_exchange` (for
    /// QUIC: sends and receives on one thread, payloads delivered from the decrypted packets);
    /// neither starts a thread. A step that sends to one side and receives from the other sends
    /// from a scoped thread, so neither side can wait on the other.
    fn stream_exchange(
        &self,
        sends: Vec<(Channel, Piece)>,
        receives: &[(Rank, Channel)],
        arrived: &mut Arrived<'_>,
    ) -> Result<()> {
        let peers =
            || sends.iter().map(|(_, piece)| piece.peer).chain(receives.iter().map(|r| r.0));
        if peers().all(|peer| self.is_local(peer)) {
            return self.local.stream_exchange(sends, receives, arrived);
        }
        let me = Rank(self.rank);
        if peers().all(|peer| !self.is_local(peer)) {
            let sends = sends
                .into_iter()
                .map(|(channel, piece)| {
                    let wire = Self::channel(channel, me, piece.peer);
                    (wire, Piece { peer: Rank(self.process(piece.peer)), ..piece })
                })
                .collect();
            let receives: Vec<(Rank, Channel)> = receives
                .iter()
                .map(|&(peer, channel)| {
                    (Rank(self.process(peer)), Self::channel(channel, peer, me))
                })
                .collect();
            return self.remote.stream_exchange(sends, &receives, arrived);
        }
        let sends = sends
            .into_iter()
            .map(|(channel, piece)| Ok((piece.peer, channel, piece.to_message()?)))
            .collect::<Result<Vec<_>>>()?;
        self.overlapped(sends, || {
            receives.iter().enumerate().try_for_each(|(index, &(peer, channel))| {
                deliver(arrived, index, &self.recv(peer, channel)?)
            })
        })
    }
}
