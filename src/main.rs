//! The `windshift-runner` command line.

use clap::{Parser, Subcommand};
use windshift_runner::journal::tools::{self as journal_tools, JournalArgs};

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
    /// Read, replay, verify and export the run journal offline (exit 0 clean, 1 findings,
    /// 2 cannot run).
    Journal(JournalArgs),
}

fn main() {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            eprintln!("windshift-runner: the daemon is not built yet (see README)");
            std::process::exit(2);
        }
        Command::Journal(args) => {
            let code = journal_tools::run(&args, &mut std::io::stdout(), &mut std::io::stderr());
            std::process::exit(code);
        }
    }
}
