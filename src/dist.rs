//! The worker side of a job: who am I, how big is the world, where is the master.
//!
//! [`init`] reads the environment that `meshflow launch` (torchrun's names), `srun` (SLURM) or
//! `mpirun` (Open MPI) set, in that order of precedence, and returns a typed [`World`]; with none
//! of them the process is alone, a world of one. Nothing else is read from the environment.
//!
//! ```no_run
//! let world = meshflow::dist::init()?;
//! println!("rank {} of {}", world.rank, world.world_size);
//! # Ok::<(), meshflow::dist::DistError>(())
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meshflow_comm::cluster::{
    self, ClusterConfig, ClusterError, Health, Link, Member, MemberInfo, Rendezvous,
    WatchedCommunicator, WatchedTransport,
};
use meshflow_comm::quic::{JobSecret, QuicConfig, QuicEndpoint, QuicTransport};
use meshflow_comm::{Communicator, Rank, TransportCommunicator};

use crate::launch::hostlist;
use crate::launch::plan::{DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT};
use crate::launch::secret::{self, SecretError, SECRET_FILE_VARIABLE};

/// Which launcher's environment the world came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `meshflow launch` or torchrun (`RANK`, `WORLD_SIZE`, …).
    Torchrun,
    /// `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, …).
    Slurm,
    /// `mpirun` (`OMPI_COMM_WORLD_RANK`, …).
    OpenMpi,
    /// None: a world of one.
    Alone,
}

/// This process's place in the job.
#[derive(Clone, PartialEq, Eq)]
pub struct World {
    /// Global rank, 0..world_size.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Index among the processes of this host (selects the GPU).
    pub local_rank: usize,
    /// Number of processes on this host.
    pub local_world_size: usize,
    /// Host of rank 0, which serves the rendezvous.
    pub master_addr: String,
    /// Port of the rendezvous.
    pub master_port: u16,
    /// Where the values came from.
    pub launcher: Launcher,
    secret: Option<Vec<u8>>,
}

impl World {
    /// A world of one process, as when no launcher is found.
    pub fn alone() -> Self {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: DEFAULT_MASTER_ADDR.to_string(),
            master_port: DEFAULT_MASTER_PORT,
            launcher: Launcher::Alone,
            secret: None,
        }
    }

    /// The job secret, when the launcher provided one (always, with more than one process).
    pub fn secret(&self) -> Option<&[u8]> {
        self.secret.as_deref()
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("World")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_world_size", &self.local_world_size)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("launcher", &self.launcher)
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// Why the environment does not describe a usable world.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A variable that the launcher should have set is absent.
    #[error("{name} is not set: {hint}")]
    MissingVariable {
        /// The variable.
        name: &'static str,
        /// What sets it.
        hint: String,
    },
    /// A variable holds something unusable.
    #[error("invalid value {value:?} in {name}: {reason}")]
    InvalidVariable {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The job secret could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The master address does not resolve.
    #[error("cannot resolve the master address {address}: {reason}")]
    Resolve {
        /// `host:port`.
        address: String,
        /// Why.
        reason: String,
    },
    /// The rendezvous, the store or failure detection reported an error.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Comm(#[from] meshflow_comm::Error),
}

/// Settings of [`World::join`].
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    /// Rendezvous and failure-detection timing.
    pub cluster: ClusterConfig,
    /// The QUIC endpoints' settings.
    pub quic: QuicConfig,
    /// Devices this rank drives, announced to every rank (0 is taken as 1).
    pub devices: u32,
}

impl World {
    /// Joins the job: rank 0 serves the rendezvous at the master address, every rank binds its
    /// data endpoint, joins, and waits for the whole world (or the join timeout).
    pub fn join(&self, options: &JoinOptions) -> Result<Job, DistError> {
        let secret = match &self.secret {
            Some(bytes) => JobSecret::new(bytes.clone())?,
            None => JobSecret::generate()?,
        };
        let master = resolve(&self.master_addr, self.master_port)?;
        let local_ip = local_ip_towards(master);
        let data = QuicEndpoint::bind(
            SocketAddr::new(local_ip, 0),
            Rank(self.rank),
            secret.clone(),
            options.quic.clone(),
        )?;
        let me = MemberInfo {
            rank: u32::try_from(self.rank).unwrap_or(u32::MAX),
            data_addr: data.local_address()?.to_string(),
            devices: options.devices.max(1),
        };
        if self.rank == 0 {
            return self.host(master, secret, data, me, options);
        }
        let member = data.block_on(cluster::join_over_quic(
            &data,
            master,
            me,
            self.world_size,
            &options.cluster,
        ))?;
        Ok(Job {
            world: self.clone(),
            runner: data.clone(),
            data,
            rendezvous: None,
            member: Some(member),
            finish_timeout: options.cluster.join_timeout,
            data_plane: Mutex::new(None),
            settle: settle_time(&options.cluster),
        })
    }

    fn host(
        &self,
        master: SocketAddr,
        secret: JobSecret,
        data: QuicEndpoint,
        me: MemberInfo,
        options: &JoinOptions,
    ) -> Result<Job, DistError> {
        let listen = SocketAddr::new(unspecified_like(master.ip()), master.port());
        let endpoint = QuicEndpoint::bind(listen, Rank(0), secret, options.quic.clone())?;
        let cluster = options.cluster.clone();
        let world_size = self.world_size;
        let (rendezvous, member) = endpoint.block_on(async {
            let rendezvous =
                cluster::serve_over_quic(endpoint.clone(), world_size, cluster.clone());
            let (near, far) = Link::pair();
            rendezvous.accept(far).await;
            let member = Member::join(near, me, world_size, &cluster).await;
            (rendezvous, member)
        });
        Ok(Job {
            world: self.clone(),
            data,
            runner: endpoint,
            rendezvous: Some(rendezvous),
            member: Some(member?),
            finish_timeout: options.cluster.join_timeout,
            data_plane: Mutex::new(None),
            settle: settle_time(&options.cluster),
        })
    }
}

/// A joined job: the world's members, the store and barrier, the job's health, and this rank's
/// data endpoint (for the comm transports). Blocking methods; call them from ordinary threads.
#[derive(Debug)]
pub struct Job {
    world: World,
    data: QuicEndpoint,
    runner: QuicEndpoint,
    rendezvous: Option<Rendezvous>,
    member: Option<Member>,
    finish_timeout: Duration,
    data_plane: Mutex<Option<Arc<WatchedTransport>>>,
    settle: Duration,
}

/// How long a comm error waits for the failure detection to name its cause: the detection bound.
fn settle_time(config: &ClusterConfig) -> Duration {
    config.failure_timeout + 2 * config.heartbeat_interval
}

impl Job {
    /// This process's world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Every rank's data address and device count, ordered by rank.
    pub fn members(&self) -> &[MemberInfo] {
        self.member().members()
    }

    /// The job's health, for any layer that waits on peers (see [`Health::check`]).
    pub fn health(&self) -> Health {
        self.member().health()
    }

    /// This rank's data endpoint; every rank's address is in [`Job::members`].
    pub fn data_endpoint(&self) -> &QuicEndpoint {
        &self.data
    }

    /// Every rank's data address, ordered by rank (for `QuicTransport::connect_mesh`).
    pub fn data_addresses(&self) -> Result<Vec<SocketAddr>, DistError> {
        self.members()
            .iter()
            .map(|member| {
                member.data_addr.parse().map_err(|_| DistError::Resolve {
                    address: member.data_addr.clone(),
                    reason: format!("rank {} announced an invalid address", member.rank),
                })
            })
            .collect()
    }

    /// Connects this rank's data plane to every other rank's: one authenticated QUIC connection
    /// per pair, watched by the job's [`Health`] (see [`WatchedTransport`]): once a rank is
    /// declared failed, every pending and later operation on it fails with
    /// `meshflow_comm::Error::PeerFailed` naming that rank. Collective: every rank calls it once
    /// (directly or through its first [`Job::communicator`]); later calls return the same
    /// transport. Blocking waits are bounded by [`JoinOptions::quic`]'s operation timeout.
    pub fn connect(&self) -> Result<Arc<WatchedTransport>, DistError> {
        // Held while connecting, so that concurrent first calls connect once.
        let mut data_plane = self.data_plane.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(transport) = data_plane.as_ref() {
            return Ok(transport.clone());
        }
        let addresses = self.data_addresses()?;
        let health = self.health();
        let transport = QuicTransport::connect_mesh(self.data.clone(), &addresses)
            .map_err(|error| named(&health, "connect", error))?;
        let closer = self.data.clone();
        let watched = Arc::new(WatchedTransport::new(
            Arc::new(transport),
            health,
            &self.data.runtime(),
            self.settle,
            Box::new(move || closer.close()),
        ));
        *data_plane = Some(watched.clone());
        Ok(watched)
    }

    /// A communicator over the global `ranks` (this rank among them; every member passes the
    /// same list in the same order), on the health-watched data plane: a collective blocked on a
    /// rank that dies or stops answering fails within the failure-detection bound, naming it
    /// (`meshflow_comm::Error::PeerFailed`). The first call connects the data plane
    /// ([`Job::connect`]), which every rank must reach; later calls talk to the group only.
    pub fn communicator(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, DistError> {
        let transport = self.connect()?;
        let group = ranks.iter().copied().map(Rank).collect();
        let inner = TransportCommunicator::new(transport, group)?;
        Ok(Box::new(WatchedCommunicator::new(Box::new(inner), self.health())))
    }

    /// Stores a value for every rank.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        Ok(self.member().set(key, value)?)
    }

    /// The value of `key`, waiting until some rank sets it (or a peer fails).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        Ok(self.runner.block_on(self.member().get(key))?)
    }

    /// Waits until every rank has entered barrier `name` (or a peer fails).
    pub fn barrier(&self, name: &str) -> Result<(), DistError> {
        Ok(self.runner.block_on(self.member().barrier(name))?)
    }

    /// Leaves the job in order; rank 0 keeps serving until every other rank has left or failed.
    pub fn finish(mut self) -> Result<(), DistError> {
        let left = match self.member.take() {
            Some(member) => self.runner.block_on(member.leave()),
            None => Ok(()),
        };
        if let Some(rendezvous) = self.rendezvous.take() {
            self.runner.block_on(rendezvous.finish(self.finish_timeout));
        }
        Ok(left?)
    }

    fn member(&self) -> &Member {
        match &self.member {
            Some(member) => member,
            None => unreachable!("the member is only taken by finish, which consumes the job"),
        }
    }
}

/// How long rank 0 keeps serving after a failure, so that the rendezvous delivers it to every
/// rank before this process exits.
const FAILURE_LINGER: Duration = Duration::from_millis(500);

impl Drop for Job {
    fn drop(&mut self) {
        let failed = self.member.as_ref().is_some_and(|member| member.health().check().is_err());
        if failed && self.rendezvous.is_some() {
            self.runner.block_on(async { tokio::time::sleep(FAILURE_LINGER).await });
        }
        // Drop the member and rendezvous inside their runtime (their tasks are aborted).
        let _guard = self.runner.runtime().enter();
        self.member.take();
        self.rendezvous.take();
    }
}

/// `error`, or the failure of the rank that caused it when the health knows one.
fn named(health: &Health, operation: &str, error: meshflow_comm::Error) -> meshflow_comm::Error {
    match health.failure() {
        Some(failure) => meshflow_comm::Error::PeerFailed {
            peer: Rank(failure.rank),
            operation: operation.to_string(),
            reason: failure.reason,
        },
        None => error,
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, DistError> {
    let address = format!("{host}:{port}");
    let mut found = (host, port).to_socket_addrs().map_err(|error| DistError::Resolve {
        address: address.clone(),
        reason: error.to_string(),
    })?;
    found.next().ok_or(DistError::Resolve { address, reason: "no address".to_string() })
}

/// The local address that routes towards `peer` (no packet is sent).
fn local_ip_towards(peer: SocketAddr) -> IpAddr {
    let probe = UdpSocket::bind(SocketAddr::new(unspecified_like(peer.ip()), 0))
        .and_then(|socket| socket.connect(peer).map(|_| socket))
        .and_then(|socket| socket.local_addr());
    match probe {
        Ok(address) => address.ip(),
        Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Reads this process's world from the environment.
pub fn init() -> Result<World, DistError> {
    from_env(&|name| std::env::var(name).ok())
}

/// Reads a world from an environment lookup (for tests and embedders).
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<World, DistError> {
    let mut world = if env("RANK").is_some() {
        torchrun_world(env)?
    } else if env("SLURM_PROCID").is_some() {
        slurm_world(env)?
    } else if env("OMPI_COMM_WORLD_RANK").is_some() {
        open_mpi_world(env)?
    } else {
        World::alone()
    };
    if world.rank >= world.world_size {
        return Err(DistError::InvalidVariable {
            name: "RANK",
            value: world.rank.to_string(),
            reason: format!("must be below the world size {}", world.world_size),
        });
    }
    world.secret = match env(SECRET_FILE_VARIABLE) {
        Some(path) => Some(secret::read(std::path::Path::new(&path))?),
        None if world.world_size > 1 => {
            return Err(DistError::MissingVariable {
                name: SECRET_FILE_VARIABLE,
                hint: "a job of several processes needs the job secret: run under `meshflow \
                       launch`, or export it as the path of a 0600 file holding the secret, \
                       the same on every node"
                    .to_string(),
            })
        }
        None => None,
    };
    Ok(world)
}

fn torchrun_world(env: &dyn Fn(&str) -> Option<String>) -> Result<World, DistError> {
    let hint = "`meshflow launch` and torchrun set it with RANK";
    let world_size = required(env, "WORLD_SIZE", hint)?;
    Ok(World {
        rank: required(env, "RANK", hint)?,
        world_size,
        local_rank: optional(env, "LOCAL_RANK")?.unwrap_or(0),
        local_world_size: optional(env, "LOCAL_WORLD_SIZE")?.unwrap_or(1),
        master_addr: env("MASTER_ADDR").unwrap_or_else(|| DEFAULT_MASTER_ADDR.to_string()),
        master_port: master_port(env)?,
        launcher: Launcher::Torchrun,
        secret: None,
    })
}

fn slurm_world(env: &dyn Fn(&str) -> Option<String>) -> Result<World, DistError> {
    let hint = "srun sets it with SLURM_PROCID";
    let list = env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")).ok_or_else(|| {
        DistError::MissingVariable { name: "SLURM_JOB_NODELIST", hint: hint.to_string() }
    })?;
    let hosts = hostlist::expand(&list).map_err(|error| DistError::InvalidVariable {
        name: "SLURM_JOB_NODELIST",
        value: list.clone(),
        reason: error.reason,
    })?;
    Ok(World {
        rank: required(env, "SLURM_PROCID", hint)?,
        world_size: required(env, "SLURM_NTASKS", hint)?,
        local_rank: optional(env, "SLURM_LOCALID")?.unwrap_or(0),
        local_world_size: optional(env, "SLURM_NTASKS_PER_NODE")?.unwrap_or(1),
        master_addr: env("MASTER_ADDR").unwrap_or_else(|| hosts[0].clone()),
        master_port: master_port(env)?,
        launcher: Launcher::Slurm,
        secret: None,
    })
}

fn open_mpi_world(env: &dyn Fn(&str) -> Option<String>) -> Result<World, DistError> {
    let hint = "mpirun sets it with OMPI_COMM_WORLD_RANK";
    let world_size = required(env, "OMPI_COMM_WORLD_SIZE", hint)?;
    let local_world_size = optional(env, "OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(1);
    let master_addr = match env("MASTER_ADDR") {
        Some(addr) => addr,
        None if local_world_size == world_size => DEFAULT_MASTER_ADDR.to_string(),
        None => {
            return Err(DistError::MissingVariable {
                name: "MASTER_ADDR",
                hint: "mpirun spans several hosts: pass `-x MASTER_ADDR=<host of rank 0>`"
                    .to_string(),
            })
        }
    };
    Ok(World {
        rank: required(env, "OMPI_COMM_WORLD_RANK", hint)?,
        world_size,
        local_rank: optional(env, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0),
        local_world_size,
        master_addr,
        master_port: master_port(env)?,
        launcher: Launcher::OpenMpi,
        secret: None,
    })
}

fn master_port(env: &dyn Fn(&str) -> Option<String>) -> Result<u16, DistError> {
    match env("MASTER_PORT") {
        Some(text) => text.trim().parse().map_err(|_| DistError::InvalidVariable {
            name: "MASTER_PORT",
            value: text,
            reason: "not a port number".to_string(),
        }),
        None => Ok(DEFAULT_MASTER_PORT),
    }
}

fn required(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    hint: &str,
) -> Result<usize, DistError> {
    let text =
        env(name).ok_or_else(|| DistError::MissingVariable { name, hint: hint.to_string() })?;
    parse(name, text)
}

fn optional(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<usize>, DistError> {
    env(name).map(|text| parse(name, text)).transpose()
}

fn parse(name: &'static str, text: String) -> Result<usize, DistError> {
    let value = text.trim().parse();
    value.map_err(|_| DistError::InvalidVariable {
        name,
        value: text,
        reason: "not a non-negative integer".to_string(),
    })
}
