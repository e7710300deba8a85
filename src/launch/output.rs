//! Worker output: every line goes to the launcher's own stdout or stderr with a `[rank N] ` prefix,
//! to `--log-dir` when given, and into a short tail kept for the failure report.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::JoinHandle;

/// Lines of output kept per rank for the failure report.
pub const TAIL_LINES: usize = 20;

/// The longest line forwarded as one line; longer ones are cut into pieces of this size.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Which of the launcher's streams a worker stream goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Out,
    /// Standard error.
    Err,
}

/// The last lines one worker printed (both streams, in arrival order).
#[derive(Debug, Clone, Default)]
pub struct Tail {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl Tail {
    /// Records one line, dropping the oldest beyond [`TAIL_LINES`].
    pub fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The lines kept, oldest first.
    pub fn lines(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect()
    }
}

/// A log file shared by the two streams of one worker.
pub type LogFile = Arc<Mutex<File>>;

/// Forwards one worker stream line by line until it closes.
pub fn forward<R>(
    reader: R,
    rank: usize,
    stream: Stream,
    tail: Tail,
    log: Option<LogFile>,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match read_line(&mut reader, &mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buffer);
            let line = line.trim_end_matches(['\n', '\r']);
            emit(rank, stream, line, log.as_ref());
            tail.push(line.to_string());
        }
    })
}

/// Reads up to a newline or [`MAX_LINE_BYTES`], whichever comes first.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buffer: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(buffer.len());
        }
        let room = MAX_LINE_BYTES - buffer.len();
        let window = &available[..available.len().min(room)];
        let (taken, done) = match window.iter().position(|&byte| byte == b'\n') {
            Some(index) => (index + 1, true),
            None => (window.len(), buffer.len() + window.len() == MAX_LINE_BYTES),
        };
        buffer.extend_from_slice(&window[..taken]);
        reader.consume(taken);
        if done {
            return Ok(buffer.len());
        }
    }
}

fn emit(rank: usize, stream: Stream, line: &str, log: Option<&LogFile>) {
    // Output errors (a closed terminal) must not stop the supervision of the job.
    let _ = match stream {
        Stream::Out => writeln!(std::io::stdout().lock(), "[rank {rank}] {line}"),
        Stream::Err => writeln!(std::io::stderr().lock(), "[rank {rank}] {line}"),
    };
    if let Some(log) = log {
        let mut file = log.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(file, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_in_order() {
        let tail = Tail::default();
        for index in 0..TAIL_LINES + 5 {
            tail.push(format!("line {index}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines[TAIL_LINES - 1], format!("line {}", TAIL_LINES + 4));
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_short_ones_kept() {
        let mut text = vec![b'x'; MAX_LINE_BYTES + 10];
        text.extend_from_slice(b"\nshort\n");
        let mut reader = BufReader::new(&text[..]);
        let mut buffer = Vec::new();
        assert_eq!(read_line(&mut reader, &mut buffer).await.unwrap(), MAX_LINE_BYTES);
        buffer.clear();
        assert_eq!(read_line(&mut reader, &mut buffer).await.unwrap(), 11);
        buffer.clear();
        read_line(&mut reader, &mut buffer).await.unwrap();
        assert_eq!(buffer, b"short\n");
    }
}
