//! The binary: parse the command line, set up logging, and hand over to the
//! library. `run` exits 64 on a bad config and 0 after a graceful shutdown.
//! `demo` runs the proxy against its own token endpoint and echo upstream
//! (`token_injector::demo`), exits 1 if it cannot start, 0 after Ctrl-C.
//! A build without the cargo feature `demo` (the production image) keeps
//! the subcommand, so the help is the same, but `demo` only says so and
//! exits 64.
//!
//! Before `run` reads any secret it turns core dumps off: a dump of this
//! process would hold client secrets, private keys and tokens.
//! `TOKEN_INJECTOR_ALLOW_CORE_DUMPS=1` keeps the inherited settings, for
//! debugging a crash.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "token-injector",
    version,
    about = "Egress sidecar that injects OAuth 2.0 client-credentials tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, env = "TOKEN_INJECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and every file it names; one line per problem.
    Check {
        #[arg(long, env = "TOKEN_INJECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Try it out: the proxy with a built-in token endpoint and echo upstream.
    ///
    /// Starts, in this process on 127.0.0.1, a token endpoint issuing
    /// short-lived tokens, an HTTPS echo upstream that shows each request as
    /// it arrives, and the proxy in front of them; prints the curl lines to
    /// try. Ctrl-C stops everything.
    Demo(DemoArgs),
}

#[cfg(feature = "demo")]
type DemoArgs = token_injector::demo::Options;

// Without the `demo` feature: whatever follows `demo` (`--help` too) is
// taken, so that any flags get the one line below rather than a parse error.
#[cfg(not(feature = "demo"))]
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
struct DemoArgs {
    #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
    _args: Vec<std::ffi::OsString>,
}

/// EX_USAGE from sysexits.h: the configuration is unusable (or `demo` was
/// asked of a build without it).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match token_injector::config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} profiles, {} routes)",
                    config.display(),
                    c.profiles.len(),
                    c.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                for line in e.lines() {
                    eprintln!("{line}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            init_tracing();
            forbid_core_dumps();
            let path = config;
            let config = match token_injector::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    for line in e.lines() {
                        tracing::error!("{line}");
                    }
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match build_runtime() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(config, path))
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo(_) => {
            eprintln!(
                "token-injector: this binary was built without the \"demo\" feature \
                 (cargo build --features demo)"
            );
            ExitCode::from(EXIT_CONFIG)
        }
        #[cfg(feature = "demo")]
        Command::Demo(options) => {
            init_tracing();
            forbid_core_dumps();
            let runtime = match build_runtime() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(demo(options))
        }
    }
}

/// `demo`: like `run`, with the demo's own config, and SIGHUP (the terminal
/// closing) stops it too.
#[cfg(feature = "demo")]
async fn demo(options: token_injector::demo::Options) -> ExitCode {
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let demo = match token_injector::demo::Demo::start(options).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(demo.banner().as_bytes());
        let _ = out.flush();
    }
    tokio::select! {
        _ = signals.term.recv() => tracing::info!("SIGTERM received"),
        _ = signals.int.recv() => tracing::info!("SIGINT received"),
        _ = signals.hup.recv() => tracing::info!("SIGHUP received"),
    }
    tracing::info!("stopping the demo");
    demo.shutdown().await;
    ExitCode::SUCCESS
}

async fn run(config: token_injector::config::Config, path: PathBuf) -> ExitCode {
    // Handlers first: a signal during start-up must drain, not kill.
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match token_injector::start(config).await {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The token requests and listeners go first: setting up the watch waits
    // for the watcher's new thread, a scheduler slice (~5 ms) on a busy CPU.
    tokio::task::yield_now().await;
    let (hup_tx, hup_rx) = tokio::sync::mpsc::channel(1);
    let watching = Arc::clone(&running);
    let set_up =
        tokio::task::spawn_blocking(move || token_injector::reload::spawn(watching, path, hup_rx))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
    let watcher = match set_up {
        Ok(task) => Some(task),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    loop {
        tokio::select! {
            _ = signals.hup.recv() => {
                tracing::info!("SIGHUP received: reloading the config");
                let _ = hup_tx.try_send(());
            }
            _ = signals.term.recv() => { tracing::info!("SIGTERM received"); break }
            _ = signals.int.recv() => { tracing::info!("SIGINT received"); break }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    if let Some(w) = watcher {
        w.abort();
        let _ = w.await;
    }
    match Arc::try_unwrap(running) {
        Ok(r) => r.shutdown().await,
        Err(_) => tracing::warn!("a reload was still running; stopping without draining"),
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKEN_INJECTOR_WORKERS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0);
    // One worker: a single-threaded scheduler, which skips the work-stealing
    // machinery (the usual sidecar setting).
    let mut builder = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all();
    // The blocking pool runs upstream DNS lookups (one per new connection)
    // and little else; tokio's default of 512 threads let a burst of new
    // connections start hundreds of threads, each with its own malloc arena.
    builder.max_blocking_threads(8);
    if let Some(n) = workers.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    builder.build()
}

/// Opt-out of [`forbid_core_dumps`]: `1` or `true`.
const ALLOW_CORE_DUMPS: &str = "TOKEN_INJECTOR_ALLOW_CORE_DUMPS";

/// Sets `RLIMIT_CORE` to 0 (soft and hard, so nothing in the process can
/// raise it again) and marks the process not dumpable (`PR_SET_DUMPABLE`
/// 0), which also covers a `core_pattern` pipe that ignores the limit and
/// stops other processes of the same user from attaching with ptrace or
/// reading `/proc/<pid>/environ` and `/proc/<pid>/mem`, where a secret
/// from `client_secret_env` or a token could be read. Failure is logged,
/// never fatal: a sandbox may forbid the calls.
fn forbid_core_dumps() {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let allow =
        std::env::var(ALLOW_CORE_DUMPS).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if allow {
        tracing::warn!(
            "{ALLOW_CORE_DUMPS} is set: core dumps stay enabled and may contain secrets and tokens"
        );
        return;
    }
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, none) {
        tracing::warn!(error = %e, "cannot set RLIMIT_CORE to 0");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "cannot mark the process not dumpable");
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json =
        std::env::var("TOKEN_INJECTOR_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colour only for a person at a terminal, never in collected logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM and SIGINT stop; SIGHUP reloads. Registered before start-up.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}
