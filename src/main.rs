//! The `meshflow` binary: a small dispatcher over subcommands, each implemented in the library.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};

use meshflow::launch::{self, LaunchArgs, LaunchError};

/// meshflow: a distributed tensor runtime in the style of OneFlow.
#[derive(Debug, Parser)]
#[command(name = "meshflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the workers of one node (torchrun-style): `meshflow launch [flags] -- program args…`.
    Launch(LaunchArgs),
    /// Join the world that `meshflow launch` (or srun, mpirun) set up and check it: all-gather
    /// through the rendezvous store, barrier, report.
    Selftest(launch::selftest::SelftestArgs),
    /// Compile a model for a described cluster without running it and predict its step time.
    Plan(meshflow::plan::cli::PlanArgs),
    /// Measure a section (train, ops, comm, actors, all) against references in the same run.
    Bench(meshflow::bench::BenchArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Launch(args) => launch_command(&args),
        Command::Selftest(args) => launch::selftest::run(&args),
        Command::Plan(args) => meshflow::plan::cli::run(&args),
        Command::Bench(args) => meshflow::bench::run(&args),
    }
}

fn launch_command(args: &LaunchArgs) -> ExitCode {
    let result = launch::plan(args).and_then(|plan| launch::run(args, &plan));
    match result {
        Ok(code) => code,
        Err(error) => usage_error(&error),
    }
}

/// Setting errors are shown like clap's own (usage, exit status 2); others are plain failures.
fn usage_error(error: &LaunchError) -> ExitCode {
    let kind = match error {
        LaunchError::Plan(launch::plan::PlanError::Missing { .. })
        | LaunchError::Secret(launch::secret::SecretError::MissingForMultiNode { .. }) => {
            ErrorKind::MissingRequiredArgument
        }
        LaunchError::Plan(_) | LaunchError::Secret(_) => ErrorKind::ValueValidation,
        LaunchError::Io(_) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = Cli::command();
    let launch = command.find_subcommand_mut("launch").cloned();
    let mut launch = launch.unwrap_or(command).bin_name("meshflow launch");
    launch.error(kind, error).exit()
}
