//! Resolution of flags and scheduler environments, on the launcher side (`launch::plan`) and the
//! worker side (`dist::from_env`), with environments given as tables.

use std::collections::HashMap;
use std::ffi::OsString;

use meshflow::dist::{self, DistError, Launcher};
use meshflow::launch::plan::{self, PlanError, Scheduler};
use meshflow::launch::LaunchArgs;

fn args() -> LaunchArgs {
    LaunchArgs {
        nnodes: None,
        node_rank: None,
        nproc_per_node: 2,
        master_addr: None,
        master_port: None,
        max_restarts: 0,
        log_dir: None,
        stop_grace_secs: 5.0,
        secret_file: None,
        command: vec![OsString::from("train")],
    }
}

fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let table: HashMap<String, String> =
        pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
    move |name| table.get(name).cloned()
}

#[test]
fn standalone_defaults_are_torchruns() {
    let plan = plan::resolve(&args(), &environment(&[])).unwrap();
    assert_eq!((plan.nnodes, plan.node_rank, plan.world_size()), (1, 0, 2));
    assert_eq!((plan.master_addr.as_str(), plan.master_port), ("127.0.0.1", 29500));
    assert_eq!(plan.scheduler, Scheduler::Standalone);
}

#[test]
fn slurm_tasks_are_nodes_and_the_first_host_is_the_master() {
    let env = environment(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "2"),
        ("SLURM_TASKS_PER_NODE", "2(x3),1,1"),
        ("SLURM_JOB_NODELIST", "gpu-a[07-09],gpu-b1"),
    ]);
    let plan = plan::resolve(&args(), &env).unwrap();
    assert_eq!(plan.scheduler, Scheduler::Slurm);
    assert_eq!((plan.nnodes, plan.node_rank), (8, 5));
    assert_eq!((plan.rank(0), plan.rank(1), plan.world_size()), (10, 11, 16));
    assert_eq!((plan.local_rank_offset, plan.local_world_size), (2, 4));
    assert_eq!(plan.master_addr, "gpu-a07");
}

#[test]
fn open_mpi_across_hosts_needs_a_master_address() {
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ];
    let error = plan::resolve(&args(), &environment(&pairs)).unwrap_err();
    assert!(matches!(&error, PlanError::Missing { what, .. } if what == "--master-addr"));
    let mut with_master = args();
    with_master.master_addr = Some("head".to_string());
    let plan = plan::resolve(&with_master, &environment(&pairs)).unwrap();
    assert_eq!((plan.scheduler, plan.node_rank, plan.nnodes), (Scheduler::OpenMpi, 1, 4));
    assert_eq!(
        (plan.local_rank_offset, plan.local_world_size, plan.master_addr.as_str()),
        (2, 4, "head")
    );
}

#[test]
fn flags_override_the_environment() {
    let mut flags = args();
    flags.nnodes = Some(3);
    flags.node_rank = Some(2);
    flags.master_port = Some(4000);
    let env = environment(&[("NODE_RANK", "1"), ("MASTER_PORT", "5000"), ("MASTER_ADDR", "m")]);
    let plan = plan::resolve(&flags, &env).unwrap();
    assert_eq!((plan.node_rank, plan.master_port, plan.master_addr.as_str()), (2, 4000, "m"));
}

#[test]
fn workers_read_torchrun_slurm_and_open_mpi_names() {
    let directory = tempfile::tempdir().unwrap();
    let secret = directory.path().join("secret");
    std::fs::write(&secret, "00112233445566778899aabbccddeeff").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret = secret.to_str().unwrap();
    let world = dist::from_env(&environment(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "1234"),
        ("MESHFLOW_SECRET_FILE", secret),
    ]))
    .unwrap();
    assert_eq!((world.rank, world.world_size, world.local_rank), (3, 4, 1));
    assert_eq!((world.master_addr.as_str(), world.master_port), ("node0", 1234));
    assert_eq!(world.launcher, Launcher::Torchrun);
    assert_eq!(world.secret(), Some(&b"00112233445566778899aabbccddeeff"[..]));
    assert!(!format!("{world:?}").contains("0011223344"), "the secret leaked into Debug");
    let world = dist::from_env(&environment(&[
        ("SLURM_PROCID", "2"),
        ("SLURM_NTASKS", "3"),
        ("SLURM_JOB_NODELIST", "n[3-5]"),
        ("MESHFLOW_SECRET_FILE", secret),
    ]))
    .unwrap();
    assert_eq!((world.rank, world.world_size, world.master_addr.as_str()), (2, 3, "n3"));
    let world = dist::from_env(&environment(&[
        ("OMPI_COMM_WORLD_RANK", "0"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("MESHFLOW_SECRET_FILE", secret),
    ]))
    .unwrap();
    assert_eq!((world.launcher, world.master_addr.as_str()), (Launcher::OpenMpi, "127.0.0.1"));
    let alone = dist::from_env(&environment(&[])).unwrap();
    assert_eq!((alone.rank, alone.world_size, alone.launcher), (0, 1, Launcher::Alone));
}

#[test]
fn workers_name_what_is_missing() {
    let error = dist::from_env(&environment(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
    assert!(matches!(error, DistError::MissingVariable { name: "MESHFLOW_SECRET_FILE", .. }));
    let error = dist::from_env(&environment(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
    assert!(matches!(error, DistError::InvalidVariable { name: "RANK", .. }));
    let error = dist::from_env(&environment(&[("RANK", "0")])).unwrap_err();
    assert!(matches!(error, DistError::MissingVariable { name: "WORLD_SIZE", .. }));
}
