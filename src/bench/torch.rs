//! The PyTorch reference: `scripts/torch_train.py` run in the same `meshflow bench` run. The
//! GPT comes twice: the script's model (explicit softmax, what the goal compares with) and the
//! same model on torch's fused attention (`torch-sdpa`). Data-parallel strategies get
//! `scripts/torch_ddp.py` (DistributedDataParallel over gloo, as many processes as the strategy
//! has devices) next to them.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

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
/// on a GPU). `Ok(None)` when python3 or torch is missing, or, for `cuda`, torch sees no GPU
/// (the reference is then skipped).
pub fn measure(
    script: &Path,
    models: &[Model],
    threads: usize,
    (seconds, min_steps): (f64, usize),
    world: Option<usize>,
    device: TrainDevice,
) -> Result<Option<Vec<TorchFigure>>, BenchError> {
    if !available(device) {
        return Ok(None);
    }
    let mut command = script_command(script, models, (threads, min_steps), device);
    command.arg("--seconds").arg(seconds.to_string());
    if let Some(world) = world {
        command.arg("--world").arg(world.to_string());
    }
    let output =
        command.output().map_err(|e| BenchError::Torch(format!("{}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(BenchError::Torch(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    parse(&String::from_utf8_lossy(&output.stdout)).map(Some)
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
    stdout: BufReader<ChildStdout>,
    /// What the script wrote to stderr so far, drained by `drainer` so that it never blocks.
    stderr: Arc<Mutex<String>>,
    drainer: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `script --serve` for `models` with `threads` on `device`, each request timing at
    /// least `min_steps` steps, and waits until it has built and warmed them. `Ok(None)` when
    /// python3 or torch is missing, or, for `cuda`, torch sees no GPU (the reference is then
    /// skipped).
    pub fn start(
        script: &Path,
        models: &[Model],
        (threads, min_steps): (usize, usize),
        device: TrainDevice,
    ) -> Result<Option<Server>, BenchError> {
        if !available(device) {
            return Ok(None);
        }
        let mut command = script_command(script, models, (threads, min_steps), device);
        command.arg("--serve");
        Server::spawn(script, command).map(Some)
    }

    /// Runs `command` (the script `script`, or a stand-in) as a server and waits for its ready
    /// line.
    fn spawn(script: &Path, mut command: Command) -> Result<Server, BenchError> {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child =
            command.spawn().map_err(|e| BenchError::Torch(format!("{}: {e}", script.display())))?;
        let taken = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(mut errors)) = taken else {
            unreachable!("the three streams were piped above")
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let drainer = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = errors.read_to_string(&mut text);
            sink.lock().unwrap_or_else(|e| e.into_inner()).push_str(&text);
        });
        let mut server = Server {
            script: script.to_path_buf(),
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            stderr,
            drainer: Some(drainer),
        };
        let ready = server.answer()?;
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
        let answer = self.answer()?;
        let figures = parse(&answer)?;
        if !figures.iter().any(|f| f.model == model) {
            return Err(self.failed(&format!("no {} figure in {answer:?}", model.name()), false));
        }
        Ok(figures)
    }

    /// The next JSON line the script prints (other lines skipped).
    fn answer(&mut self) -> Result<String, BenchError> {
        loop {
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) => return Err(self.failed("exited before answering", true)),
                Ok(_) if line.trim_start().starts_with('{') => return Ok(line.trim().to_owned()),
                Ok(_) => continue,
                Err(e) => return Err(self.failed(&format!("unreadable output: {e}"), false)),
            }
        }
    }

    /// The error for `what` went wrong, with the script's exit status and stderr when it has
    /// ended (`ended`: its output or input closed, so it is ending: wait for that).
    fn failed(&mut self, what: &str, ended: bool) -> BenchError {
        let patience = std::time::Duration::from_secs(if ended { 5 } else { 0 });
        let status = match self.exit_status(patience) {
            Some(status) => {
                // Ended: its stderr is closed, and the drainer has all of it once it returns.
                if let Some(drainer) = self.drainer.take() {
                    let _ = drainer.join();
                }
                format!(" ({status})")
            }
            None => String::new(),
        };
        let stderr = self.stderr.lock().unwrap_or_else(|e| e.into_inner()).trim_end().to_owned();
        BenchError::Torch(format!("{} --serve{status}: {what}: {stderr}", self.script.display()))
    }

    /// The script's exit status once it has ended, waiting up to `patience` for that; `None`
    /// while it runs.
    fn exit_status(&mut self, patience: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF: the script's loop ends
        if self.exit_status(std::time::Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether python3 imports torch (and, for `cuda`, torch sees a GPU): whether a reference
/// can run on `device`.
pub fn available(device: TrainDevice) -> bool {
    let probe = Command::new("python3").args(["-c", probe(device)]).output();
    probe.is_ok_and(|o| o.status.success())
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
        Server::spawn(Path::new("stand-in.py"), command)
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
        let early = Server::spawn(Path::new("gone.py"), {
            let mut command = Command::new("sh");
            command.arg("-c").arg("echo 'no module named torch' >&2; exit 1");
            command
        });
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
