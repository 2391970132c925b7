//! Running child commands with their output streamed, and failing with what ran.

use std::{
    ffi::{OsStr, OsString},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};

/// A header line before each step, so CI logs show where time went.
pub fn step(name: &str) {
    eprintln!("\n==> {name}");
}

pub fn run(program: &OsStr, args: &[&str], dir: &Path) -> anyhow::Result<()> {
    run_with_env(program, args, dir, &[])
}

/// [`run`] with `env` set for this run only.
pub fn run_with_env(
    program: &OsStr,
    args: &[&str],
    dir: &Path,
    env: &[(&str, OsString)],
) -> anyhow::Result<()> {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .envs(env.iter().cloned());
    status(command)
}

pub fn cargo(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    cargo_with_env(args, dir, &[])
}

/// cargo with `env` set (rustc's flags, the target directory) for this run only.
pub fn cargo_with_env(args: &[&str], dir: &Path, env: &[(&str, OsString)]) -> anyhow::Result<()> {
    run_with_env(cargo_bin().as_ref(), args, dir, env)
}

/// cargo of the nightly toolchain, with target/tools/bin (bpf-linker) on PATH.
pub fn cargo_nightly(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo"])
        .args(args)
        .current_dir(dir)
        .env("PATH", crate::bootstrap::path_with_tools(dir)?)
        // The toolchain is chosen by rustup here, not by the outer cargo.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    status(command)
}

fn status(mut command: Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}
