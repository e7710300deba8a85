//! Act timings and their export as Chrome-trace JSON (opens in Perfetto, one lane per device).

use std::io::Write;

use serde_json::{json, Value};

use crate::{ActorId, DeviceId, Error, Plan};

/// One act: who, where, which piece, when (nanoseconds; virtual in the simulator, since the
/// driver started in the threaded driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// The actor.
    pub actor: ActorId,
    /// Its device.
    pub device: DeviceId,
    /// The act's sequence number (the piece, for per-piece actors).
    pub sequence: u64,
    /// When the act started.
    pub start: u64,
    /// When it ended.
    pub end: u64,
}

/// The acts recorded while tracing was on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// Every act, in the order recorded.
    pub events: Vec<TraceEvent>,
}

impl Trace {
    /// The trace as a Chrome-trace JSON object: one complete ("X") event per act, one thread
    /// (lane) per device, times in microseconds.
    pub fn chrome_json<P>(&self, plan: &Plan<P>) -> Value {
        let mut devices: Vec<DeviceId> = self.events.iter().map(|event| event.device).collect();
        devices.sort();
        devices.dedup();
        let lanes = devices.iter().map(|device| {
            json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": device.0,
                   "args": {"name": device.to_string()}})
        });
        let acts = self.events.iter().map(|event| {
            json!({"name": plan.name(event.actor), "cat": "act", "ph": "X", "pid": 0,
                   "tid": event.device.0, "ts": event.start as f64 / 1000.0,
                   "dur": event.end.saturating_sub(event.start) as f64 / 1000.0,
                   "args": {"piece": event.sequence, "actor": event.actor.0}})
        });
        json!({"traceEvents": lanes.chain(acts).collect::<Vec<_>>(), "displayTimeUnit": "ns"})
    }

    /// Writes [`Trace::chrome_json`] to `writer`.
    pub fn write_chrome<P>(&self, plan: &Plan<P>, writer: impl Write) -> Result<(), Error> {
        serde_json::to_writer(writer, &self.chrome_json(plan)).map_err(std::io::Error::from)?;
        Ok(())
    }
}
