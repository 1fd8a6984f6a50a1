//! The `windshift-runner` command line.

use clap::{Parser, Subcommand};

/// Crash-tolerant runner host for Windshift coding-agent runs.
#[derive(Parser, Debug)]
#[command(name = "windshift-runner", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the runner daemon (the default command). Arrives with the daemon issue.
    Run,
}

fn main() {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            eprintln!("windshift-runner: the daemon is not built yet (see README)");
            std::process::exit(2);
        }
    }
}
