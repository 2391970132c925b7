//! `cargo xtask`: bootstraps the eBPF toolchain, builds, and runs the privileged tests.
#![forbid(unsafe_code)]

mod bootstrap;
mod cmd;
mod pgo;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Built for the BPF target by gateway/build.rs; a host build of it cannot link (no_std,
/// and workspace feature unification would pull std in through gateway-common).
const EBPF_CRATE: &str = "gateway-ebpf";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install nightly's rust-src and build bpf-linker (once, under target/tools).
    Bootstrap,
    /// Bootstrap, then build every binary of the workspace. With `--release`, the gateway
    /// is built profile-guided, to target/<host>/release/gateway (needs root: its training
    /// run is a `gateway run`), and the other binaries to target/release; target/release/
    /// gateway is not built (an older one there is left as it was).
    Build {
        #[arg(long)]
        release: bool,
        /// With --release: no profile-guided build of the gateway (target/release/gateway
        /// only).
        #[arg(long, requires = "release")]
        no_pgo: bool,
    },
    /// Bootstrap, lint, build, and run every test as root (README.md's test command).
    Test {
        /// Passed to `cargo test` after `--`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build in release mode, and run the benchmarks (figures, not pass/fail).
    Bench,
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    match Cli::parse().command {
        Command::Bootstrap => bootstrap::run(&root),
        Command::Build { release, no_pgo } => {
            bootstrap::run(&root)?;
            if release && !no_pgo {
                release_build(&root).map(drop)
            } else {
                build(&root, release)
            }
        }
        Command::Test { args } => test(&root, &args),
        Command::Bench => {
            bootstrap::run(&root)?;
            // The scripts run the gateway a deployment would: the profile-guided build.
            let gateway = release_build(&root)?;
            let env = [("GATEWAY", gateway.into_os_string())];
            cmd::step("benchmarks");
            for script in [
                "connect.sh",
                "tunnel.sh",
                "policy-scale.sh",
                "reload.sh",
                "serve.sh",
            ] {
                let path = root.join("tests/bench").join(script);
                cmd::run_with_env(path.as_os_str(), &[], &root, &env)?;
            }
            cmd::cargo(
                &[
                    "bench",
                    "--package",
                    "gateway",
                    "--bench",
                    "policy_scale",
                    "--bench",
                    "audit_record",
                ],
                &root,
            )
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .context("xtask has no parent directory")
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    cmd::step("build");
    let mut args = vec!["build", "--workspace", "--exclude", EBPF_CRATE, "--bins"];
    if release {
        args.push("--release");
    }
    cmd::cargo(&args, root)
}

/// The release build: the gateway profile-guided (to target/<host>/release, whose path it
/// returns), the workspace's other binaries as usual.
fn release_build(root: &Path) -> anyhow::Result<PathBuf> {
    cmd::step("build (release, all but the gateway)");
    cmd::cargo(
        &[
            "build",
            "--release",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--exclude",
            "gateway",
            "--bins",
        ],
        root,
    )?;
    pgo::build(root)
}

fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    bootstrap::run(root)?;
    bootstrap::check_host()?;
    if !bootstrap::is_root() {
        anyhow::bail!("the privileged tests need root: run `sudo cargo xtask test`");
    }
    cmd::step("format");
    cmd::cargo(&["fmt", "--all", "--check"], root)?;
    cmd::step("clippy (userspace)");
    cmd::cargo(
        &[
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        root,
    )?;
    cmd::step("clippy (eBPF)");
    cmd::cargo_nightly(
        &[
            "clippy",
            "--package",
            "gateway-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ],
        root,
    )?;
    cmd::step("build");
    cmd::cargo(
        &[
            "build",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--bins",
            "--tests",
        ],
        root,
    )?;
    cmd::step("tests (as root, one at a time: they share kernel state)");
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--no-fail-fast",
        "--",
    ];
    args.push("--test-threads=1");
    args.extend(extra.iter().map(String::as_str));
    cmd::cargo(&args, root)
}
