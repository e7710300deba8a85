//! From flags and the scheduler's environment to the plan of one node: which ranks it runs, where the
//! master is. Pure: the environment comes in as a lookup function, so every case is unit-tested.
//!
//! Precedence, per setting: an explicit flag, then the scheduler (SLURM, then Open MPI), then
//! torchrun's own variables in the launcher's environment (`NODE_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), then the documented default.
//!
//! Under a scheduler, each of its tasks is one launcher, i.e. one "node" in torchrun's sense:
//! `srun --ntasks-per-node=1 meshflow launch --nproc-per-node 4 prog` runs four workers per host,
//! `srun --ntasks-per-node=4 meshflow launch prog` runs one worker per task; both number ranks the
//! same way (rank = task × nproc-per-node + local index).

use super::hostlist;
use super::LaunchArgs;

/// The default rendezvous port, torchrun's.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// The default master address.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";

/// Which scheduler's variables were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// None: flags and defaults only.
    Standalone,
    /// SLURM (`SLURM_PROCID` was set).
    Slurm,
    /// Open MPI (`OMPI_COMM_WORLD_RANK` was set).
    OpenMpi,
}

/// What this launcher runs: resolved from flags and environment, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// Number of launchers (nodes) in the job.
    pub nnodes: usize,
    /// This launcher's index, torchrun's `GROUP_RANK`.
    pub node_rank: usize,
    /// Workers this launcher starts.
    pub nproc_per_node: usize,
    /// `LOCAL_RANK` of this launcher's first worker (non-zero when a scheduler runs several
    /// launchers on one host).
    pub local_rank_offset: usize,
    /// `LOCAL_WORLD_SIZE`: workers on this host.
    pub local_world_size: usize,
    /// Host of rank 0, where the rendezvous is served.
    pub master_addr: String,
    /// Port of the rendezvous.
    pub master_port: u16,
    /// Where the settings came from.
    pub scheduler: Scheduler,
}

impl NodePlan {
    /// Number of workers in the whole job.
    pub fn world_size(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }

    /// Global rank of this launcher's `index`-th worker.
    pub fn rank(&self, index: usize) -> usize {
        self.node_rank * self.nproc_per_node + index
    }
}

/// A setting that is missing or wrong; the binary shows it as a clap error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A setting that must be given is absent.
    #[error("{what} is not set: {hint}")]
    Missing {
        /// The setting, e.g. `--node-rank`.
        what: String,
        /// What to set.
        hint: String,
    },
    /// A setting has a value that cannot be used.
    #[error("invalid value {value:?} for {name}: {reason}")]
    Invalid {
        /// The flag or variable.
        name: String,
        /// The value found.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
}

/// Resolves the plan of this node from the flags and an environment lookup.
pub fn resolve(
    args: &LaunchArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<NodePlan, PlanError> {
    let found = scheduler_view(env)?;
    let nnodes = args.nnodes.or(found.tasks).unwrap_or(1);
    if nnodes == 0 {
        return Err(invalid("--nnodes", "0", "a job has at least one node"));
    }
    let node_rank = match args.node_rank.or(found.task) {
        Some(rank) => rank,
        None => match env("NODE_RANK") {
            Some(text) => parse_count("NODE_RANK", &text)?,
            None if nnodes == 1 => 0,
            None => return Err(missing_node_rank(nnodes)),
        },
    };
    if node_rank >= nnodes {
        return Err(invalid(
            "--node-rank",
            &node_rank.to_string(),
            &format!("must be below --nnodes ({nnodes})"),
        ));
    }
    let nproc_per_node = args.nproc_per_node;
    let master_addr = master_addr(args, env, &found, nnodes)?;
    let master_port = match (args.master_port, env("MASTER_PORT")) {
        (Some(port), _) => port,
        (None, Some(text)) => {
            text.parse().map_err(|_| invalid("MASTER_PORT", &text, "not a port number"))?
        }
        (None, None) => DEFAULT_MASTER_PORT,
    };
    Ok(NodePlan {
        nnodes,
        node_rank,
        nproc_per_node,
        local_rank_offset: found.local_task.unwrap_or(0) * nproc_per_node,
        local_world_size: found.local_tasks.unwrap_or(1) * nproc_per_node,
        master_addr,
        master_port,
        scheduler: found.scheduler,
    })
}

fn missing_node_rank(nnodes: usize) -> PlanError {
    PlanError::Missing {
        what: "--node-rank".to_string(),
        hint: format!(
            "--nnodes is {nnodes}, so each launcher needs its index: pass --node-rank <0..{nnodes}> \
             (or set NODE_RANK, or run under srun / mpirun)"
        ),
    }
}

fn master_addr(
    args: &LaunchArgs,
    env: &dyn Fn(&str) -> Option<String>,
    found: &SchedulerView,
    nnodes: usize,
) -> Result<String, PlanError> {
    if let Some(addr) = args.master_addr.clone().or_else(|| env("MASTER_ADDR")) {
        return Ok(addr);
    }
    if let Some(first) = found.first_host.clone() {
        return Ok(first);
    }
    let spans_hosts = found.scheduler == Scheduler::OpenMpi && found.local_tasks != Some(nnodes);
    if spans_hosts {
        return Err(PlanError::Missing {
            what: "--master-addr".to_string(),
            hint: "Open MPI runs this job on several hosts: pass --master-addr <host of rank 0> \
                   (or set MASTER_ADDR)"
                .to_string(),
        });
    }
    Ok(DEFAULT_MASTER_ADDR.to_string())
}

/// What a scheduler says about this launcher, if one is found.
#[derive(Debug)]
struct SchedulerView {
    scheduler: Scheduler,
    tasks: Option<usize>,
    task: Option<usize>,
    local_task: Option<usize>,
    local_tasks: Option<usize>,
    first_host: Option<String>,
}

impl SchedulerView {
    fn standalone() -> Self {
        SchedulerView {
            scheduler: Scheduler::Standalone,
            tasks: None,
            task: None,
            local_task: None,
            local_tasks: None,
            first_host: None,
        }
    }
}

fn scheduler_view(env: &dyn Fn(&str) -> Option<String>) -> Result<SchedulerView, PlanError> {
    if env("SLURM_PROCID").is_some() {
        return slurm_view(env);
    }
    if env("OMPI_COMM_WORLD_RANK").is_some() {
        return open_mpi_view(env);
    }
    Ok(SchedulerView::standalone())
}

fn slurm_view(env: &dyn Fn(&str) -> Option<String>) -> Result<SchedulerView, PlanError> {
    let hint = "srun sets it; outside srun, unset SLURM_PROCID";
    let task = required_count(env, "SLURM_PROCID", hint)?;
    let tasks = required_count(env, "SLURM_NTASKS", hint)?;
    let local_task = optional_count(env, "SLURM_LOCALID")?;
    let node = optional_count(env, "SLURM_NODEID")?.unwrap_or(0);
    let local_tasks = match env("SLURM_TASKS_PER_NODE") {
        Some(text) => tasks_on_node(&text, node)?,
        None => None,
    };
    let first_host = match env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")) {
        Some(list) => hostlist::expand(&list)
            .map_err(|error| invalid("SLURM_JOB_NODELIST", &list, &error.reason))?
            .into_iter()
            .next(),
        None => None,
    };
    Ok(SchedulerView {
        scheduler: Scheduler::Slurm,
        tasks: Some(tasks),
        task: Some(task),
        local_task,
        local_tasks,
        first_host,
    })
}

fn open_mpi_view(env: &dyn Fn(&str) -> Option<String>) -> Result<SchedulerView, PlanError> {
    let hint = "mpirun sets it; outside mpirun, unset OMPI_COMM_WORLD_RANK";
    Ok(SchedulerView {
        scheduler: Scheduler::OpenMpi,
        task: Some(required_count(env, "OMPI_COMM_WORLD_RANK", hint)?),
        tasks: Some(required_count(env, "OMPI_COMM_WORLD_SIZE", hint)?),
        local_task: optional_count(env, "OMPI_COMM_WORLD_LOCAL_RANK")?,
        local_tasks: optional_count(env, "OMPI_COMM_WORLD_LOCAL_SIZE")?,
        first_host: None,
    })
}

/// Parses SLURM's `SLURM_TASKS_PER_NODE` (`2(x3),1`) and returns the count on node `node`.
pub fn tasks_on_node(text: &str, node: usize) -> Result<Option<usize>, PlanError> {
    let mut seen = 0usize;
    for part in text.split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((count, rest)) => (count, rest.strip_suffix(')').unwrap_or("")),
            None => (part, "1"),
        };
        let count = parse_count("SLURM_TASKS_PER_NODE", count)?;
        let repeat = parse_count("SLURM_TASKS_PER_NODE", repeat)?;
        seen = seen.saturating_add(repeat);
        if node < seen {
            return Ok(Some(count));
        }
    }
    Ok(None)
}

fn required_count(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    hint: &str,
) -> Result<usize, PlanError> {
    match env(name) {
        Some(text) => parse_count(name, &text),
        None => Err(PlanError::Missing { what: name.to_string(), hint: hint.to_string() }),
    }
}

fn optional_count(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<usize>, PlanError> {
    env(name).map(|text| parse_count(name, &text)).transpose()
}

fn parse_count(name: &str, text: &str) -> Result<usize, PlanError> {
    text.trim().parse().map_err(|_| invalid(name, text, "not a non-negative integer"))
}

fn invalid(name: &str, value: &str, reason: &str) -> PlanError {
    PlanError::Invalid {
        name: name.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}
