//! The `windshift-runner` command line.

use clap::{Args, Parser, Subcommand};
use windshift_runner::config::RunnerConfig;
use windshift_runner::control::EXIT_CONFIG;
use windshift_runner::daemon::{self, DaemonOptions, Shutdown};
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
    /// Run the runner daemon (the default command). Every flag also reads its environment
    /// variable; flags win. The secrets WSRUNNER_REGISTRATION_TOKEN and WSRUNNER_CREDENTIAL
    /// are read from the environment only. Exit codes: 0 stopped, 1 fatal error,
    /// 77 credential rejected, 78 configuration error.
    Run(Box<RunArgs>),
    /// The whole job end to end on this machine with no set-up: an embedded devserver, a
    /// local git repository and the test agent image.
    Demo(windshift_runner::demo::DemoArgs),
    /// Read, replay, verify and export the run journal offline (exit 0 clean, 1 findings,
    /// 2 cannot run).
    Journal(JournalArgs),
    /// Check this host's setup (server, credential, Docker, image, disk, git, journal) without
    /// registering or pulling; one PASS/WARN/FAIL line per check. Exit 1 when a check fails.
    Doctor(Box<DoctorArgs>),
    /// Talk to the running daemon over its local control socket: pause (no new claims,
    /// persisted across restarts), resume, status. Exit 0 done, 1 refused or no usable
    /// answer, 3 the runner is not running.
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The runner's control directory [default: ctl beside the journal directory].
    #[arg(long, env = "WSRUNNER_CTL_DIR")]
    ctl_dir: Option<std::path::PathBuf>,
    /// The runner's journal directory, to find the default control directory.
    #[arg(long, env = "WSRUNNER_JOURNAL_DIR")]
    journal_dir: Option<std::path::PathBuf>,
    /// Print the runner's JSON answer line instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum CtlAction {
    /// Stop claiming new runs (heartbeats and runs in flight go on); survives a restart.
    Pause,
    /// Claim again.
    Resume,
    /// Paused or not, health, and the runs in flight (id, state, since, container).
    Status,
}

#[derive(Args, Debug)]
struct DoctorArgs {
    #[command(flatten)]
    config: RunnerConfig,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Take one run, finish it, and exit 0 (ephemeral hosts).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    config: RunnerConfig,
}

fn main() {
    // No subcommand means `run`, configured from the environment.
    let cli = match Cli::parse() {
        Cli { command: None } => Cli::parse_from(["windshift-runner", "run"]),
        cli => cli,
    };
    let code = match cli.command {
        Some(Command::Run(args)) => run(*args),
        Some(Command::Demo(args)) => windshift_runner::demo::run(&args),
        Some(Command::Journal(args)) => {
            journal_tools::run(&args, &mut std::io::stdout(), &mut std::io::stderr())
        }
        Some(Command::Doctor(args)) => doctor(*args),
        Some(Command::Ctl(args)) => {
            let dir = windshift_runner::config::ctl_dir(
                args.ctl_dir.as_deref(),
                args.journal_dir.as_deref(),
            );
            let cmd = match args.action {
                CtlAction::Pause => "pause",
                CtlAction::Resume => "resume",
                CtlAction::Status => "status",
            };
            daemon::ctl::client(
                &dir,
                cmd,
                args.json,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
        }
        None => 2,
    };
    std::process::exit(code);
}

fn run(mut args: RunArgs) -> i32 {
    args.config.read_secrets_from_env();
    args.config.read_option_a_from_env();
    let cfg = match args.config.validate(hostname().as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("windshift-runner: {e}");
            return EXIT_CONFIG;
        }
    };
    windshift_runner::logging::init(cfg.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("windshift-runner: cannot start the async runtime: {e}");
            return daemon::EXIT_FATAL;
        }
    };
    let code = runtime.block_on(async move {
        let shutdown = Shutdown::default();
        if let Err(e) = shutdown.install_signal_handlers() {
            eprintln!("windshift-runner: cannot install signal handlers: {e}");
            return daemon::EXIT_FATAL;
        }
        let mut opts = DaemonOptions::new(shutdown);
        opts.once = args.once;
        daemon::run(cfg, opts).await
    });
    // Dropping the runtime would wait for every blocking thread, including a step abandoned
    // after a stop (docs/git.md, "Cancellation"): the exit must not wait on it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

fn doctor(mut args: DoctorArgs) -> i32 {
    args.config.read_secrets_from_env();
    args.config.read_option_a_from_env();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("windshift-runner: cannot start the async runtime: {e}");
            return daemon::EXIT_FATAL;
        }
    };
    let opts = windshift_runner::doctor::DoctorOptions::default();
    let report = runtime.block_on(windshift_runner::doctor::run(
        &args.config,
        hostname().as_deref(),
        &opts,
    ));
    if let Err(e) = report.render(&mut std::io::stdout()) {
        eprintln!("windshift-runner: cannot write the report: {e}");
        return daemon::EXIT_FATAL;
    }
    report.exit_code()
}

/// The machine's host name (the default display name).
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}
