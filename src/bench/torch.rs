//! The PyTorch reference: `scripts/torch_train.py` run in the same `meshflow bench` run. The
//! GPT comes twice: the script's model (explicit softmax, what the goal compares with) and the
//! same model on torch's fused attention (`torch-sdpa`). Data-parallel strategies get
//! `scripts/torch_ddp.py` (DistributedDataParallel over gloo, as many processes as the strategy
//! has devices) next to them.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use serde::Deserialize;

use super::report::TorchFigure;
use super::train::{Model, StepTimes, TrainDevice};
use super::BenchError;

/// The script's JSON.
#[derive(Debug, Deserialize)]
struct Output {
    torch: String,
    threads: usize,
    /// Processes of a DDP run (absent: one).
    #[serde(default)]
    world: Option<usize>,
    /// `cpu` or `cuda` (absent: the CPU).
    #[serde(default)]
    device: TrainDevice,
    gpt: Option<Times>,
    /// The GPT with torch's fused attention (`F.scaled_dot_product_attention`).
    #[serde(default)]
    gpt_sdpa: Option<Times>,
    mlp: Option<Times>,
}

#[derive(Debug, Deserialize)]
struct Times {
    median_ms: f64,
    mean_ms: f64,
    steps: usize,
}

/// Runs the script for `models` with `threads` and `seconds` of timing per model, at least
/// `min_steps` steps each (and `--world N` when `world` is given: the DDP script; `--device cuda`
/// on a GPU), stopping it when it has not ended `patience` after its timed seconds.
/// `Ok(None)` when python3 or torch is missing, or, for `cuda`, torch sees no GPU (the
/// reference is then skipped).
pub fn measure(
    script: &Path,
    models: &[Model],
    threads: usize,
    (seconds, min_steps): (f64, usize),
    world: Option<usize>,
    (device, patience): (TrainDevice, Duration),
) -> Result<Option<Vec<TorchFigure>>, BenchError> {
    if !available(device, patience)? {
        return Ok(None);
    }
    let mut command = script_command(script, models, (threads, min_steps), device);
    command.arg("--seconds").arg(seconds.to_string());
    if let Some(world) = world {
        command.arg("--world").arg(world.to_string());
    }
    let limit = timed(seconds * models.len() as f64, patience);
    let (status, stdout, stderr) = run_bounded(script, command, limit)?;
    if !status.success() {
        return Err(BenchError::Torch(format!(
            "{} failed ({status}): {}",
            script.display(),
            stderr.trim_end()
        )));
    }
    parse(&stdout).map(Some)
}

/// Runs `command` (the script `script`) in a process group of its own to its end, or, when it
/// has not ended within `limit`, kills the group (the DDP script's worker processes with it)
/// and fails with what it wrote to stderr. Its exit status, stdout and stderr.
fn run_bounded(
    script: &Path,
    mut command: Command,
    limit: Duration,
) -> Result<(ExitStatus, String, String), BenchError> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child =
        command.spawn().map_err(|source| BenchError::Io { path: script.into(), source })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("both streams were piped above")
    };
    let (stdout, stderr) = (drain(stdout), drain(stderr));
    let Some(status) = exited_within(&mut child, limit) else {
        stop(&mut child);
        let stderr = text_of(&stderr, Duration::from_secs(1));
        return Err(BenchError::Torch(format!(
            "{}: no result within {} s; stopped: {}",
            script.display(),
            limit.as_secs_f64(),
            stderr.trim_end()
        )));
    };
    let ended = Duration::from_secs(5);
    Ok((status, text_of(&stdout, ended), text_of(&stderr, ended)))
}

/// What a child wrote to one of its streams so far ([`drain`]).
#[derive(Default)]
struct Drained {
    bytes: Vec<u8>,
    /// The stream has ended (or failed).
    ended: bool,
}

/// `seconds` of timing plus `patience`, saturating: a huge `--seconds` or `--torch-timeout`
/// waits for ever instead of overflowing.
fn timed(seconds: f64, patience: Duration) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX).saturating_add(patience)
}

/// The instant `after` from now; `None` (no deadline) past what an [`Instant`] holds.
fn deadline(after: Duration) -> Option<Instant> {
    Instant::now().checked_add(after)
}

/// `child`'s exit status once it has ended, waiting up to `patience` for that; `None` while it
/// runs (or when it cannot be waited for).
fn exited_within(child: &mut Child, patience: Duration) -> Option<ExitStatus> {
    let deadline = deadline(patience);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if deadline.is_none_or(|deadline| Instant::now() < deadline) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return None,
        }
    }
}

/// A stream read to its end on a thread of its own (so that a full pipe never blocks the
/// child), as it has arrived so far.
fn drain(mut stream: impl Read + Send + 'static) -> Arc<Mutex<Drained>> {
    let drained = Arc::new(Mutex::new(Drained::default()));
    let sink = Arc::clone(&drained);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 8192];
        loop {
            let read = stream.read(&mut buffer);
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            match read {
                Ok(0) => break sink.ended = true,
                Ok(n) => sink.bytes.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break sink.ended = true,
            }
        }
    });
    drained
}

/// What [`drain`] has read: all of it once the stream has ended, or what has arrived when
/// `wait` has passed (a process that outlived its group's kill may hold the pipe open).
fn text_of(stream: &Mutex<Drained>, wait: Duration) -> String {
    let deadline = Instant::now() + wait;
    loop {
        let drained = stream.lock().unwrap_or_else(|e| e.into_inner());
        if drained.ended || Instant::now() >= deadline {
            return String::from_utf8_lossy(&drained.bytes).into_owned();
        }
        drop(drained);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills `child`'s process group (it leads one: `process_group(0)`) and reaps it.
fn stop(child: &mut Child) {
    crate::launch::supervise::signal_group(child.id(), Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// `python3 script` with the options both scripts share: `--threads`, `--min-steps`, the device
/// (when not the CPU) and `--only` (when one model is asked for).
fn script_command(
    script: &Path,
    models: &[Model],
    (threads, min_steps): (usize, usize),
    device: TrainDevice,
) -> Command {
    let mut command = Command::new("python3");
    command.arg(script).arg("--threads").arg(threads.to_string());
    command.arg("--min-steps").arg(min_steps.to_string());
    if !device.is_cpu() {
        command.arg("--device").arg(device.name());
    }
    if let [only] = models {
        command.arg("--only").arg(only.name());
    }
    command
}

/// The one-process script in `--serve` mode, kept for every round of a run: each request times
/// one model on models built and warmed once, so that a round's PyTorch figure follows its
/// meshflow figure by a few seconds, not by a Python start (`import torch`, building, warm-up).
/// Dropping it closes the script's stdin, which ends it.
pub struct Server {
    script: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    /// The script's stdout, line by line, from a reader thread (so that every wait for an
    /// answer has a bound); the channel closes when the stream ends.
    lines: Receiver<std::io::Result<String>>,
    /// What the script wrote to stderr so far ([`drain`]).
    stderr: Arc<Mutex<Drained>>,
    /// How long past a request's timed seconds (or for its start) the script may take.
    patience: Duration,
}

impl Server {
    /// Starts `script --serve` for `models` with `threads` on `device`, each request timing at
    /// least `min_steps` steps, and waits (at most `patience`) until it has built and warmed
    /// them. `Ok(None)` when python3 or torch is missing, or, for `cuda`, torch sees no GPU (the
    /// reference is then skipped).
    pub fn start(
        script: &Path,
        models: &[Model],
        (threads, min_steps): (usize, usize),
        (device, patience): (TrainDevice, Duration),
    ) -> Result<Option<Server>, BenchError> {
        if !available(device, patience)? {
            return Ok(None);
        }
        let mut command = script_command(script, models, (threads, min_steps), device);
        command.arg("--serve");
        Server::spawn(script, command, patience).map(Some)
    }

    /// Runs `command` (the script `script`, or a stand-in) as a server in a process group of
    /// its own and waits for its ready line.
    fn spawn(
        script: &Path,
        mut command: Command,
        patience: Duration,
    ) -> Result<Server, BenchError> {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.process_group(0);
        let mut child =
            command.spawn().map_err(|e| BenchError::Torch(format!("{}: {e}", script.display())))?;
        let taken = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(errors)) = taken else {
            unreachable!("the three streams were piped above")
        };
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let failed = line.is_err();
                if send.send(line).is_err() || failed {
                    return;
                }
            }
        });
        let mut server = Server {
            script: script.to_path_buf(),
            child,
            stdin: Some(stdin),
            lines,
            stderr: drain(errors),
            patience,
        };
        let ready = server.answer(patience, "its ready line")?;
        if !ready.contains("\"ready\"") {
            return Err(server.failed(&format!("expected its ready line, got {ready:?}"), false));
        }
        Ok(server)
    }

    /// Times `model` for `seconds` (at least the `min_steps` of [`Server::start`], after one
    /// warm-up step): the figures of the answer (the GPT's two variants, or the MLP).
    pub fn time(&mut self, model: Model, seconds: f64) -> Result<Vec<TorchFigure>, BenchError> {
        let request = format!("{} {seconds}\n", model.name());
        let sent = match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(request.as_bytes()).and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin already closed")),
        };
        if let Err(e) = sent {
            return Err(self.failed(&format!("cannot send {request:?}: {e}"), true));
        }
        let within = timed(seconds, self.patience);
        let answer = self.answer(within, &format!("{request:?}"))?;
        let figures = parse(&answer)?;
        if !figures.iter().any(|f| f.model == model) {
            return Err(self.failed(&format!("no {} figure in {answer:?}", model.name()), false));
        }
        Ok(figures)
    }

    /// The next JSON line the script prints (other lines skipped), `awaited` (what it answers)
    /// within `within`; past that the script is stopped.
    fn answer(&mut self, within: Duration, awaited: &str) -> Result<String, BenchError> {
        let deadline = deadline(within);
        loop {
            let line = match deadline {
                Some(deadline) => {
                    self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                }
                None => self.lines.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match line {
                Ok(Ok(line)) if line.trim_start().starts_with('{') => {
                    return Ok(line.trim().to_owned())
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(self.failed(&format!("unreadable output: {e}"), false)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failed("exited before answering", true))
                }
                Err(RecvTimeoutError::Timeout) => {
                    stop(&mut self.child);
                    let seconds = within.as_secs_f64();
                    let what = format!("no answer to {awaited} within {seconds} s; stopped");
                    return Err(self.failed(&what, true));
                }
            }
        }
    }

    /// The error for `what` went wrong, with the script's exit status and stderr when it has
    /// ended (`ended`: its output or input closed, so it is ending: wait for that).
    fn failed(&mut self, what: &str, ended: bool) -> BenchError {
        let patience = Duration::from_secs(if ended { 5 } else { 0 });
        let (status, wait) = match exited_within(&mut self.child, patience) {
            Some(status) => (format!(" ({status})"), Duration::from_secs(1)),
            None => (String::new(), Duration::ZERO),
        };
        let stderr = text_of(&self.stderr, wait);
        let stderr = stderr.trim_end();
        BenchError::Torch(format!("{} --serve{status}: {what}: {stderr}", self.script.display()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF: the script's loop ends
        if exited_within(&mut self.child, Duration::from_secs(10)).is_none() {
            stop(&mut self.child);
        }
    }
}

/// Whether python3 imports torch (and, for `cuda`, torch sees a GPU): whether a reference
/// can run on `device`. Probed once per device in a process: a run asks before every reference
/// it starts and every DDP round, and each probe's `import torch` took about 3 s here. A probe
/// that has not ended within `patience` (a hung driver) is stopped and is an error.
pub fn available(device: TrainDevice, patience: Duration) -> Result<bool, BenchError> {
    static PROBED: Probed = Probed(Mutex::new(Vec::new()));
    PROBED.get(device, |device| {
        let mut command = Command::new("python3");
        command.args(["-c", probe(device)]);
        let what = format!("python3 -c {:?}", probe(device));
        match run_bounded(Path::new(&what), command, patience) {
            Ok((status, _, _)) => Ok(status.success()),
            // No python3: no reference, as without torch.
            Err(BenchError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    })
}

/// Probe outcomes by device.
struct Probed(Mutex<Vec<(TrainDevice, bool)>>);

impl Probed {
    /// The outcome for `device`, from `probe` the first time it gives one.
    fn get(
        &self,
        device: TrainDevice,
        probe: impl FnOnce(TrainDevice) -> Result<bool, BenchError>,
    ) -> Result<bool, BenchError> {
        let mut probed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, outcome)) = probed.iter().find(|(known, _)| *known == device) {
            return Ok(outcome);
        }
        let outcome = probe(device)?;
        probed.push((device, outcome));
        Ok(outcome)
    }
}

/// The Python that succeeds when the reference can run on `device`.
pub fn probe(device: TrainDevice) -> &'static str {
    match device {
        TrainDevice::Cpu => "import torch",
        TrainDevice::Cuda => "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
    }
}

/// The figures of the script's JSON output (its last line).
pub fn parse(stdout: &str) -> Result<Vec<TorchFigure>, BenchError> {
    let line = stdout.lines().last().unwrap_or_default();
    let output: Output = serde_json::from_str(line)
        .map_err(|e| BenchError::Torch(format!("unreadable output {line:?}: {e}")))?;
    let figure = |model: Model, times: &Option<Times>, fused_attention: bool| {
        times.as_ref().map(|t| TorchFigure {
            model,
            threads: output.threads,
            version: output.torch.clone(),
            times: StepTimes {
                median: t.median_ms / 1e3,
                mean: t.mean_ms / 1e3,
                steps: t.steps,
                rounds: Vec::new(),
            },
            fused_attention,
            processes: output.world.unwrap_or(1),
            device: output.device,
        })
    };
    Ok([
        figure(Model::Gpt, &output.gpt, false),
        figure(Model::Gpt, &output.gpt_sdpa, true),
        figure(Model::Mlp, &output.mlp, false),
    ]
    .into_iter()
    .flatten()
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_attention_gpt_is_a_second_gpt_figure() {
        let times = |ms: f64| format!(r#"{{"median_ms": {ms}, "mean_ms": {ms}, "steps": 5}}"#);
        let line = format!(
            r#"{{"torch": "2.x", "threads": 2, "gpt": {}, "gpt_sdpa": {}, "mlp": {}}}"#,
            times(120.0),
            times(90.0),
            times(17.0)
        );
        let figures = parse(&format!("warming up\n{line}")).expect("parse");
        let summary: Vec<(Model, bool, f64)> =
            figures.iter().map(|f| (f.model, f.fused_attention, f.times.median)).collect();
        assert_eq!(
            summary,
            [(Model::Gpt, false, 0.12), (Model::Gpt, true, 0.09), (Model::Mlp, false, 0.017)]
        );
        let ddp = times(300.0);
        let line = format!(r#"{{"torch": "2.x", "threads": 1, "world": 2, "gpt": {ddp}}}"#);
        let figures = parse(&line).expect("parse");
        assert_eq!(
            (figures.len(), figures[0].processes, figures[0].label()),
            (1, 2, "ddp2×1thr".into())
        );
        assert!(!figures[0].is_goal_reference());
        let old =
            r#"{"torch": "2.x", "threads": 2, "gpt": {"median_ms": 1, "mean_ms": 1, "steps": 1}}"#;
        assert_eq!(parse(old).expect("parse").len(), 1);
        assert_eq!(parse(old).expect("parse")[0].device, TrainDevice::Cpu, "absent: the CPU");
    }

    #[test]
    fn the_scripts_get_the_runs_threads_min_steps_device_and_model() {
        let args = |command: &Command| -> Vec<String> {
            command.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        let script = Path::new("scripts/torch_train.py");
        let one = script_command(script, &[Model::Mlp], (2, 7), TrainDevice::Cpu);
        assert_eq!(one.get_program(), "python3");
        assert_eq!(
            args(&one),
            ["scripts/torch_train.py", "--threads", "2", "--min-steps", "7", "--only", "mlp"]
        );
        let both = script_command(script, &[Model::Gpt, Model::Mlp], (1, 3), TrainDevice::Cuda);
        let expected = ["scripts/torch_train.py", "--threads", "1", "--min-steps", "3"];
        assert_eq!(args(&both), [&expected[..], &["--device", "cuda"]].concat());
    }

    /// A stand-in for `torch_train.py --serve` in `sh`: `body` runs after the ready line.
    fn stand_in(body: &str) -> Result<Server, BenchError> {
        let script =
            format!("echo 'a line that is not JSON'; echo '{{\"ready\": [\"gpt\"]}}'; {body}");
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        Server::spawn(Path::new("stand-in.py"), command, Duration::from_secs(20))
    }

    /// Whether process `pid` is gone (or a zombie its new parent has yet to reap), waiting up to
    /// five seconds for that.
    fn gone(pid: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command's closing parenthesis.
            let running = state.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
            if !running {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The number after `label ` in `text`.
    fn number_after<'t>(text: &'t str, label: &str) -> &'t str {
        let start = text.find(label).map(|i| i + label.len()).unwrap_or(text.len());
        let rest = &text[start..];
        &rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())]
    }

    #[test]
    fn a_served_reference_that_hangs_is_stopped_after_its_patience() {
        // Ready, then a request that is never answered; a process of its group sleeps too.
        let body =
            "sleep 60 & echo \"helper $!\" >&2; read request; echo \"got $request\" >&2; sleep 60";
        let script = format!("echo '{{\"ready\": [\"gpt\"]}}'; {body}");
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        let patience = Duration::from_millis(500);
        let mut server = Server::spawn(Path::new("hang.py"), command, patience).expect("ready");
        let started = Instant::now();
        let message = server.time(Model::Gpt, 0.25).expect_err("no answer").to_string();
        let waited = started.elapsed();
        assert!(message.contains("hang.py --serve"), "{message}");
        assert!(
            message.contains("no answer to \"gpt 0.25\\n\" within 0.75 s; stopped"),
            "{message}"
        );
        assert!(message.contains("got gpt 0.25"), "its stderr: {message}");
        assert!(waited >= Duration::from_millis(750), "waited {waited:?}");
        assert!(waited < Duration::from_secs(30), "waited {waited:?}");
        let helper = number_after(&message, "helper ");
        assert!(!helper.is_empty(), "{message}");
        assert!(gone(helper), "the group's other process {helper} was stopped too");
        let reaped = exited_within(&mut server.child, Duration::ZERO);
        assert!(reaped.is_some(), "the script itself was reaped");
        // One that never says it is ready.
        let mut silent = Command::new("sh");
        silent.arg("-c").arg("echo 'importing torch' >&2; sleep 60");
        let message = Server::spawn(Path::new("silent.py"), silent, patience)
            .err()
            .expect("never ready")
            .to_string();
        assert!(message.contains("no answer to its ready line within 0.5 s"), "{message}");
        assert!(message.contains("importing torch"), "{message}");
    }

    #[test]
    fn a_reference_run_is_bounded_and_its_whole_group_stopped() {
        let mut quick = Command::new("sh");
        quick.arg("-c").arg("echo '{\"a\": 1}'; echo 'a warning' >&2");
        let (status, stdout, stderr) =
            run_bounded(Path::new("quick.py"), quick, Duration::from_secs(20)).expect("ran");
        assert!(status.success());
        assert_eq!((stdout.as_str(), stderr.as_str()), ("{\"a\": 1}\n", "a warning\n"));
        // A DDP run whose workers hang: the parent and its worker are killed at the limit.
        let mut hung = Command::new("sh");
        hung.arg("-c").arg("sleep 60 & echo \"worker $!\" >&2; wait");
        let started = Instant::now();
        let message = run_bounded(Path::new("torch_ddp.py"), hung, Duration::from_millis(500))
            .expect_err("hangs")
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(message.contains("torch_ddp.py: no result within 0.5 s; stopped"), "{message}");
        let worker = number_after(&message, "worker ");
        assert!(!worker.is_empty(), "{message}");
        // A program that does not exist (no python3: the probe then says "no reference").
        let missing = Command::new("/nonexistent/python3");
        let error = run_bounded(Path::new("python3"), missing, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&error, BenchError::Io { source, .. } if source.kind() == ErrorKind::NotFound)
        );
        assert!(gone(worker), "worker {worker} was stopped with its parent");
    }

    #[test]
    fn a_served_reference_answers_each_request_with_its_figures() {
        // Answers only the request the protocol promises ("gpt 0.5"), then ends at EOF.
        let answer = r#"{"torch": "2.x", "threads": 2, "gpt": {"median_ms": 120, "mean_ms": 121, "steps": 9}, "gpt_sdpa": {"median_ms": 90, "mean_ms": 91, "steps": 12}}"#;
        let body = format!(
            "while read model seconds; do [ \"$model $seconds\" = 'gpt 0.5' ] || \
             {{ echo \"bad request: $model $seconds\" >&2; exit 2; }}; echo '{answer}'; done"
        );
        let mut server = stand_in(&body).expect("ready");
        for _ in 0..2 {
            let figures = server.time(Model::Gpt, 0.5).expect("answered");
            let medians: Vec<(bool, f64)> =
                figures.iter().map(|f| (f.fused_attention, f.times.median)).collect();
            assert_eq!(medians, [(false, 0.12), (true, 0.09)]);
        }
        // A request the stand-in refuses: it exits, and the error carries its stderr and status.
        let refused = server.time(Model::Mlp, 0.5).expect_err("refused").to_string();
        assert!(refused.contains("bad request: mlp 0.5"), "{refused}");
        assert!(refused.contains("stand-in.py --serve"), "{refused}");
    }

    #[test]
    fn a_served_reference_that_fails_is_an_error_naming_why() {
        let early = Server::spawn(
            Path::new("gone.py"),
            {
                let mut command = Command::new("sh");
                command.arg("-c").arg("echo 'no module named torch' >&2; exit 1");
                command
            },
            Duration::from_secs(20),
        );
        let message = early.err().expect("no ready line").to_string();
        assert!(message.contains("gone.py --serve"), "{message}");
        assert!(message.contains("exited before answering"), "{message}");
        assert!(message.contains("no module named torch"), "{message}");
        // Ready, but its answer lacks the model asked for.
        let mlp_only =
            r#"{"torch": "2.x", "threads": 2, "mlp": {"median_ms": 1, "mean_ms": 1, "steps": 3}}"#;
        let mut server =
            stand_in(&format!("while read line; do echo '{mlp_only}'; done")).expect("ready");
        let message = server.time(Model::Gpt, 1.0).expect_err("no gpt figure").to_string();
        assert!(message.contains("no gpt figure"), "{message}");
    }

    #[test]
    fn a_patience_past_what_a_clock_holds_means_no_deadline() {
        assert_eq!(timed(1e300, Duration::from_secs(5)), Duration::MAX);
        assert_eq!(timed(2.5, Duration::from_secs(1)), Duration::from_millis(3500));
        assert!(deadline(Duration::MAX).is_none());
        let mut command = Command::new("sh");
        command.arg("-c").arg("echo '{\"ready\": []}'; read request; echo \"$request\" >&2");
        let mut server = Server::spawn(Path::new("patient.py"), command, Duration::MAX)
            .expect("ready without a deadline");
        let message = server.time(Model::Mlp, 1e300).expect_err("no answer").to_string();
        assert!(message.contains("exited before answering"), "{message}");
        assert!(message.contains("mlp 1000000"), "the request reached it: {message}");
    }

    #[test]
    fn torch_is_probed_once_per_device_and_a_failed_probe_again() {
        let probed = Probed(Mutex::new(Vec::new()));
        let mut runs = Vec::new();
        let mut ask = |device, hung: bool| {
            let outcome = probed.get(device, |d| {
                runs.push(d);
                match hung {
                    true => Err(BenchError::Torch("probe hung".into())),
                    false => Ok(d == TrainDevice::Cpu),
                }
            });
            outcome.map_err(|e| e.to_string())
        };
        let answers = [
            ask(TrainDevice::Cpu, false),
            ask(TrainDevice::Cuda, true),
            ask(TrainDevice::Cpu, true),
            ask(TrainDevice::Cuda, false),
            ask(TrainDevice::Cuda, true),
        ];
        let hung = Err("torch reference: probe hung".to_string());
        assert_eq!(answers, [Ok(true), hung, Ok(true), Ok(false), Ok(false)]);
        let expected = [TrainDevice::Cpu, TrainDevice::Cuda, TrainDevice::Cuda];
        assert_eq!(runs, expected, "cached once known; a failed probe is not an outcome");
    }

    #[test]
    fn a_gpu_run_is_labelled_cuda() {
        let times = r#"{"median_ms": 4.5, "mean_ms": 4.6, "steps": 40}"#;
        let line = format!(
            r#"{{"torch": "2.x", "threads": 1, "device": "cuda", "gpt": {times}, "gpt_sdpa": {times}}}"#
        );
        let figures = parse(&line).expect("parse");
        let labels: Vec<String> = figures.iter().map(TorchFigure::label).collect();
        assert_eq!(labels, ["torch@cuda", "sdpa@cuda"]);
        assert!(figures.iter().all(|f| f.device == TrainDevice::Cuda));
        assert!(figures[0].is_goal_reference());
        assert!(probe(TrainDevice::Cuda).contains("torch.cuda.is_available()"));
        assert_eq!(probe(TrainDevice::Cpu), "import torch");
    }
}
