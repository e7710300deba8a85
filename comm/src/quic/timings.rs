//! Wall-clock timestamps of every blocking operation of a [`super::QuicTransport`], for finding
//! where a collective's time goes across processes: with [`TIMES_VARIABLE`] set to a directory,
//! each transport writes `quic-times-RANK-PID.txt` there when dropped, one line per operation
//! (`send`, `recv`, `exchange`, `stream`: start and end in nanoseconds since the Unix epoch).
//! The processes of a job share the clock, so the lines of two ranks give each collective's
//! arrival skew and the time from the later rank's arrival to each rank's return.
//!
//! A log keeps the first [`MAX_RECORDS`] operations (about 8 MiB) and counts the rest, so a
//! long job with the variable left set does not grow without bound; the file then ends with a
//! `# dropped N` line.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Rank;

/// The environment variable naming the directory the timestamps are written to.
pub const TIMES_VARIABLE: &str = "MESHFLOW_QUIC_TIMES";

/// The most operations one log keeps.
pub const MAX_RECORDS: usize = 200_000;

/// One transport's operations: (name, start, end), the first `limit` of them.
pub(crate) struct OperationLog {
    path: PathBuf,
    limit: usize,
    records: Mutex<Records>,
}

/// What a log holds.
#[derive(Default)]
struct Records {
    kept: Vec<(&'static str, u128, u128)>,
    dropped: u64,
}

impl OperationLog {
    /// A log for `rank` when [`TIMES_VARIABLE`] is set.
    pub(crate) fn from_environment(rank: Rank) -> Option<Self> {
        let directory = std::env::var_os(TIMES_VARIABLE)?;
        let name = format!("quic-times-{}-{}.txt", rank.0, std::process::id());
        Some(OperationLog::new(PathBuf::from(directory).join(name), MAX_RECORDS))
    }

    fn new(path: PathBuf, limit: usize) -> Self {
        OperationLog { path, limit, records: Mutex::default() }
    }

    /// Runs `call`, recording its start and end under `name` when there is a log.
    pub(crate) fn timed<T>(log: Option<&Self>, name: &'static str, call: impl FnOnce() -> T) -> T {
        let Some(log) = log else { return call() };
        let start = now();
        let output = call();
        let end = now();
        let mut records = log.records.lock().unwrap_or_else(|poison| poison.into_inner());
        if records.kept.len() < log.limit {
            records.kept.push((name, start, end));
        } else {
            records.dropped += 1;
        }
        output
    }

    /// Writes the lines (a failure to write is reported on the log, not to the caller).
    pub(crate) fn write(&self) {
        let records = self.records.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut text: String = records
            .kept
            .iter()
            .map(|(name, start, end)| format!("{name} {start} {end}\n"))
            .collect();
        if records.dropped > 0 {
            text.push_str(&format!("# dropped {}\n", records.dropped));
        }
        if let Err(error) = std::fs::write(&self.path, text) {
            tracing::warn!(path = %self.path.display(), %error, "QUIC operation times not written");
        }
    }
}

fn now() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_written_one_line_each_in_order() {
        let directory = tempfile::tempdir().expect("scratch directory");
        let path = directory.path().join("quic-times.txt");
        let log = OperationLog::new(path.clone(), MAX_RECORDS);
        let value = OperationLog::timed(Some(&log), "recv", || 7);
        OperationLog::timed(Some(&log), "send", || ());
        assert_eq!(value, 7);
        assert_eq!(OperationLog::timed(None, "recv", || 8), 8);
        log.write();
        let text = std::fs::read_to_string(&path).expect("written");
        let lines: Vec<Vec<&str>> = text.lines().map(|line| line.split(' ').collect()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0][0], lines[1][0]), ("recv", "send"));
        let times: Vec<u128> =
            lines.iter().flat_map(|l| [l[1], l[2]]).map(|t| t.parse().expect("ns")).collect();
        assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{times:?}");
    }

    #[test]
    fn a_full_log_counts_what_it_drops() {
        let directory = tempfile::tempdir().expect("scratch directory");
        let path = directory.path().join("quic-times.txt");
        let log = OperationLog::new(path.clone(), 2);
        for _ in 0..5 {
            OperationLog::timed(Some(&log), "send", || ());
        }
        log.write();
        let text = std::fs::read_to_string(&path).expect("written");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[..2].iter().all(|line| line.starts_with("send ")));
        assert_eq!(lines[2], "# dropped 3");
    }
}
