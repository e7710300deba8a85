//! [`save`](super::save) in a session of several processes (see the module doc of
//! `checkpoint`): rank 0 prepares and publishes, every process writes its own ranks' files, and
//! the job's key-value store carries the temporary directory, every process's outcome and rank
//! 0's verdict, so a failure anywhere ends the save everywhere with its cause instead of a hang.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{build_index, prepare, publish, write_rank_files, Error, Index, Result, SaveOptions};
use crate::dist::Job;
use crate::session::shards::VariableSpec;
use crate::session::Session;

/// Saves collectively; every process of `job` calls it in the same order.
pub(super) fn save(
    session: &Session,
    job: &Job,
    specs: &Arc<Vec<VariableSpec>>,
    dir: &Path,
    options: &SaveOptions,
) -> Result<Index> {
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let key = format!("meshflow.checkpoint.{}", SAVES.fetch_add(1, Ordering::Relaxed));
    let (rank, world) = (job.world().rank, job.world().world_size);
    let temporary = if rank == 0 {
        let made = prepare(dir);
        set(job, &format!("{key}.directory"), &outcome(made.as_ref().map(|p| p.display())))?;
        made?
    } else {
        let answer = get(job, &format!("{key}.directory"))?;
        PathBuf::from(verdict(&answer, dir, "rank 0 could not prepare the directory")?)
    };
    let written = write_rank_files(session, specs, (&temporary, dir), options);
    set(job, &format!("{key}.written.{rank}"), &outcome(written.as_ref().map(|_| "")))?;
    if rank != 0 {
        written?;
        let answer = get(job, &format!("{key}.published"))?;
        verdict(&answer, dir, "rank 0 did not publish the checkpoint")?;
        return build_index(session, specs);
    }
    let published = written.and_then(|()| {
        for other in 1..world {
            let answer = get(job, &format!("{key}.written.{other}"))?;
            verdict(&answer, dir, &format!("rank {other} failed to write its shards"))?;
        }
        publish(session, specs, &temporary, dir)
    });
    if published.is_err() {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    set(job, &format!("{key}.published"), &outcome(published.as_ref().map(|_| "")))?;
    published
}

/// `ok <text>` or `error <message>`, as stored.
fn outcome<T: std::fmt::Display, E: std::fmt::Display>(
    result: std::result::Result<T, &E>,
) -> String {
    match result {
        Ok(text) => format!("ok {text}"),
        Err(error) => format!("error {error}"),
    }
}

/// The text of an `ok` outcome, or an error saying `what` with the stored cause.
fn verdict<'a>(answer: &'a str, dir: &Path, what: &str) -> Result<&'a str> {
    match answer.split_once(' ').unwrap_or((answer, "")) {
        ("ok", text) => Ok(text),
        (_, cause) => Err(failed(dir, format!("{what}: {cause}"))),
    }
}

fn set(job: &Job, key: &str, value: &str) -> Result<()> {
    job.set(key, value.as_bytes()).map_err(|e| failed(Path::new(key), e.to_string()))
}

fn get(job: &Job, key: &str) -> Result<String> {
    let bytes = job.get(key).map_err(|e| failed(Path::new(key), e.to_string()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn failed(dir: &Path, reason: String) -> Error {
    Error::Session(crate::Error::Runtime(format!("checkpoint {}: {reason}", dir.display())))
}
