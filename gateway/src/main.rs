//! `gateway`: an egress gateway for AI-agent sandboxes.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use gateway::{audit, policy, run, sandbox, serve, tunnel};

/// Run commands in a sandbox whose only way out is the gateway's tunnel.
#[derive(Parser)]
#[command(name = "gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run CMD in a new sandbox: eBPF egress lockdown, tunnel, audit log.
    Run {
        /// The policy file (TOML, version 1).
        #[arg(long)]
        policy: PathBuf,
        /// Append audit records here (JSON Lines).
        #[arg(long, default_value = audit::DEFAULT_LOG)]
        audit_log: PathBuf,
        /// Rotate the audit log when it would grow past N bytes (also 64K, 10M, 1G):
        /// FILE becomes FILE.1, FILE.1 becomes FILE.2, ... up to FILE.10.
        #[arg(long, value_name = "N", value_parser = audit::cli::parse_size)]
        audit_max_bytes: Option<u64>,
        /// Run CMD as this user (name or uid); default SUDO_UID/SUDO_GID, else nobody.
        #[arg(long)]
        user: Option<String>,
        /// Learn mode, for writing a policy: HTTP(S) requests the policy refuses because no
        /// rule allows them (`not-allowlisted`) or because the name resolves to a private
        /// address (`private-address`) are forwarded anyway, without any credential, and each
        /// is recorded with verdict `would-deny`. Everything else is still refused: malformed
        /// requests, TRACE, placeholders toward unlisted hosts, oversize bodies, clients
        /// outside the sandbox, and every kernel-level refusal (direct connections, datagrams,
        /// sockets), which learn mode does not relax. Read the result with
        /// `gateway policy suggest --from LOG`.
        #[arg(long)]
        learn: bool,
        /// The tunnel's worker threads, each with its own upstream connections (1-256;
        /// default one per CPU, at most 4).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=gateway::tunnel::MAX_THREADS as i64))]
        tunnel_threads: Option<u16>,
        /// Pass this variable of the gateway's environment on to CMD although its name looks
        /// like a secret (TOKEN, SECRET, PASSWORD, ... or ending in _KEY); repeatable. Such
        /// variables are otherwise removed, with a warning naming them. A variable a
        /// credential reads is never passed on.
        #[arg(long, value_name = "NAME")]
        keep_env: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Lock down several existing cgroups, each under its own policy, behind one tunnel; runs
    /// until SIGINT or SIGTERM (which kill every sandbox). SIGHUP reloads every policy file.
    /// Start it before placing processes in the cgroups (it refuses cgroups that have any);
    /// give those processes the variables in /run/gateway/serve/NAME/env.
    Serve {
        /// The serve config (TOML): `listen`, `audit_log`, and one `[[sandbox]]` per cgroup
        /// with `cgroup` (under the cgroup v2 root) and `policy` (relative to the config).
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove what crashed runs left behind: sandboxes, pinned programs, cgroups.
    Cleanup,
    /// Read the audit log (a table, or JSON lines with --json), or verify its hash chain.
    Audit(audit::cli::AuditCli),
    /// Policy authoring tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files: exit 0 when valid, else 2 with FILE:LINE:COL: message per error.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What the tunnel would decide for one request, without any network: allow or deny, the
    /// rule (index and line) and the credential it would attach.
    Explain {
        /// The policy file (TOML, version 1).
        #[arg(long)]
        policy: PathBuf,
        /// The request method, e.g. GET.
        method: String,
        /// The absolute URL, e.g. https://api.github.com/repos/acme/app.
        url: String,
    },
    /// Write a policy that would have allowed what an audit log saw: the requests learn mode
    /// let through (`would-deny`) and allowed, and the TCP/UDP connections the kernel refused.
    /// For a person to review; it attaches no credential.
    Suggest {
        /// The audit log; its rotated files (FILE.1, FILE.2.gz, ...) are read too, oldest first.
        #[arg(long, value_name = "AUDIT_LOG")]
        from: PathBuf,
        /// Only records of the sandbox with this name (required when the log holds several).
        #[arg(long, value_name = "NAME")]
        sandbox: Option<String>,
        /// Write the policy here instead of to stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            policy,
            audit_log,
            audit_max_bytes,
            user,
            learn,
            tunnel_threads,
            keep_env,
            command,
        } => run::run(run::RunArgs {
            policy,
            audit_log: Some(audit_log),
            audit_max_bytes,
            user,
            command,
            learn,
            tunnel_threads: tunnel_threads.map(usize::from),
            keep_env,
        }),
        Command::Serve { config } => serve::serve(&config),
        Command::Cleanup => cleanup(),
        Command::Audit(args) => audit::cli::run(args),
        Command::Policy {
            command: PolicyCommand::Check { files },
        } => Ok(check(&files)),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    policy,
                    method,
                    url,
                },
        } => Ok(explain(&policy, &method, &url)),
        Command::Policy {
            command:
                PolicyCommand::Suggest {
                    from,
                    sandbox,
                    output,
                },
        } => policy::suggest::run(&from, sandbox.as_deref(), output.as_deref()),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            if let Some(p) = e.downcast_ref::<policy::PolicyError>() {
                eprintln!("{p}");
                return ExitCode::from(2);
            }
            // The operator's or the policy author's to fix, as a bad policy is: the usage
            // exit code.
            if e.downcast_ref::<tunnel::CredentialError>().is_some()
                || e.downcast_ref::<gateway::unix_reach::Replaceable>()
                    .is_some()
                || e.downcast_ref::<sandbox::stdio::StdioSocket>().is_some()
                || e.downcast_ref::<gateway::serve::leave::Leavable>()
                    .is_some()
            {
                eprintln!("gateway: {e}");
                return ExitCode::from(2);
            }
            eprintln!("gateway: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn cleanup() -> anyhow::Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("gateway cleanup needs root: run it with sudo");
    }
    let stale = sandbox::state::clean_stale()?;
    if stale.cleaned.is_empty() && stale.failed.is_empty() && stale.busy.is_empty() {
        println!("nothing to clean up");
    }
    for c in &stale.cleaned {
        println!("cleaned up {c}");
    }
    for dir in &stale.busy {
        println!(
            "left {} to the cleanup already handling it (a gateway starting, or another `gateway cleanup`)",
            dir.display()
        );
    }
    for e in &stale.failed {
        eprintln!("gateway cleanup: {e:#}");
    }
    Ok(if stale.failed.is_empty() { 0 } else { 1 })
}

fn check(files: &[PathBuf]) -> i32 {
    let mut code = 0;
    for file in files {
        match policy::check(file) {
            Ok(checked) => {
                for w in &checked.warnings {
                    eprintln!("{}", w.render(file));
                }
                println!("{}: ok ({})", file.display(), summary(&checked));
            }
            Err(e) => {
                eprintln!("{e}");
                code = 2;
            }
        }
    }
    code
}

/// The policy's summary, and its warnings when any.
fn summary(checked: &policy::Checked) -> String {
    let mut summary = checked.policy.summary();
    if !checked.warnings.is_empty() {
        summary.push_str(", ");
        summary.push_str(&policy::count(checked.warnings.len(), "warning"));
    }
    summary
}

fn explain(file: &std::path::Path, method: &str, url: &str) -> i32 {
    let checked = match policy::check(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    match policy::explain::explain(&checked, method, url) {
        Ok(decision) => {
            println!(
                "{}",
                policy::explain::Explanation {
                    checked: &checked,
                    decision,
                }
            );
            0
        }
        Err(e) => {
            eprintln!("gateway policy explain: {e}");
            2
        }
    }
}
