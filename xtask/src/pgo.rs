//! Profile-guided release builds of the gateway: an instrumented build runs a training load
//! through its tunnel, and the release build is then optimized with the profile it wrote.
//! The tunnel's request path is spread thin over hyper, tokio, rustls and the gateway's own
//! checks (docs/benchmarks.md): what the compiler learns from the profile (which branches are
//! taken, what to inline, what to keep out of the hot code) is worth more there than any one
//! piece of it.
//!
//! The training load is `gateway/examples/pgo_train.rs`: the instrumented gateway itself, under
//! `gateway run` with a real sandbox, carrying HTTP and intercepted HTTPS requests, allowed
//! and refused, to loopback upstreams. Training the gateway binary itself (not an example
//! linking the library) matters: a profile is matched by symbol names, which cargo derives
//! from the crate graph and features. Both builds therefore build the same `--bin` of the same
//! package for an explicitly named target, and differ only in the flags given to rustc.

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{bootstrap, cmd};

/// Builds the gateway for release, optimized with a profile of the training load, and
/// returns the binary's path. Needs root: the training run is a `gateway run`.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    if !bootstrap::is_root() {
        bail!(
            "the profile-guided release build trains the gateway under `gateway run`, which \
             needs root: run it as root, or `cargo xtask build --release --no-pgo` for a \
             release build without profile-guided optimization"
        );
    }
    bootstrap::check_kernel()?;
    let host = host_triple()?;
    let profdata = llvm_profdata(root, &host)?;
    let dir = root.join("target/pgo");
    let profiles = dir.join("profiles");
    if profiles.exists() {
        std::fs::remove_dir_all(&profiles)
            .with_context(|| format!("removing the old profiles in {}", profiles.display()))?;
    }
    let gateway_release = [
        "build",
        "--release",
        "--target",
        &host,
        "--package",
        "gateway",
        "--bin",
        "gateway",
    ];
    // Where each step's output goes is set here, not left to the caller's environment or
    // cargo configuration: the paths below are read back.
    let target = root.join("target");

    cmd::step("PGO 1/3: the gateway, instrumented");
    let generate = format!("-Cprofile-generate={}", profiles.display());
    cmd::cargo_with_env(
        &gateway_release,
        root,
        &flags_env(&dir.join("build"), &generate),
    )?;

    cmd::step("PGO 2/3: training run (gateway/examples/pgo_train.rs)");
    // The training client is not instrumented (its profile is not the gateway's) and is
    // built like the tests, with the dev profile.
    cmd::cargo_with_env(
        &["build", "--package", "gateway", "--example", "pgo_train"],
        root,
        &[("CARGO_TARGET_DIR", target.clone().into_os_string())],
    )?;
    let instrumented = dir.join("build").join(&host).join("release/gateway");
    cmd::run_with_env(
        target.join("debug/examples/pgo_train").as_os_str(),
        &[instrumented.to_str().context("non-UTF-8 path")?],
        root,
        // The instrumented gateway writes where it was built to write: an empty
        // LLVM_PROFILE_FILE is taken as unset.
        &[("LLVM_PROFILE_FILE", OsString::new())],
    )?;
    let merged = dir.join("gateway.profdata");
    let merged_arg = merged.to_str().context("non-UTF-8 path")?;
    let profiles_arg = profiles.to_str().context("non-UTF-8 path")?;
    // A profile that cannot be read fails the merge (the default), rather than being left out.
    cmd::run(
        profdata.as_os_str(),
        &["merge", "-o", merged_arg, profiles_arg],
        root,
    )?;
    covers_the_tunnel(&profdata, &merged)?;

    cmd::step("PGO 3/3: the gateway, optimized with the profile");
    let profile_use = format!("-Cprofile-use={merged_arg}");
    cmd::cargo_with_env(&gateway_release, root, &flags_env(&target, &profile_use))?;
    let binary = target.join(&host).join("release/gateway");
    same_symbols(&profdata, &instrumented, &binary)?;
    eprintln!("profile-guided release build: {}", binary.display());
    Ok(binary)
}

/// Fails unless the optimized build's own functions carry the names the instrumented build
/// gave them. A profile is matched by those names; had cargo named the crates differently
/// (other features, another target spelling), the profile would have been ignored without a
/// word, and the build would only look profile-guided.
fn same_symbols(profdata: &Path, instrumented: &Path, optimized: &Path) -> anyhow::Result<()> {
    let nm = profdata.with_file_name("llvm-nm");
    let gateway_symbols = |binary: &Path| -> anyhow::Result<HashSet<String>> {
        let listing = cmd::output(
            nm.to_str().context("non-UTF-8 path")?,
            &["--defined-only", binary.to_str().context("non-UTF-8 path")?],
        )?;
        Ok(listing
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter(|name| name.starts_with("_ZN7gateway"))
            .map(str::to_owned)
            .collect())
    };
    let trained = gateway_symbols(instrumented)?;
    let built = gateway_symbols(optimized)?;
    let shared = built.intersection(&trained).count();
    // Inlining and outlining differ between the two builds, so not every name is in both;
    // a different naming shares none.
    if built.is_empty() || shared * 2 < built.len() {
        bail!(
            "the profile-guided build does not match its profile: {shared} of the {} gateway \
             functions in {} have the names the instrumented build gave them",
            built.len(),
            optimized.display()
        );
    }
    eprintln!(
        "profile matched: {shared} of {} gateway functions named as in the training build",
        built.len()
    );
    Ok(())
}

/// The environment of a build into `target_dir` with `flag` given to rustc after the flags
/// the caller set in the environment. Set as CARGO_ENCODED_RUSTFLAGS, which cargo reads
/// before RUSTFLAGS: an inherited one would otherwise take the place of `flag`. (Flags from
/// cargo configuration, `build.rustflags`, give way to these as to any RUSTFLAGS.)
fn flags_env(target_dir: &Path, flag: &str) -> Vec<(&'static str, OsString)> {
    let mut flags: Vec<String> = match std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        Ok(encoded) if !encoded.is_empty() => encoded.split('\x1f').map(str::to_owned).collect(),
        _ => std::env::var("RUSTFLAGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };
    flags.push(flag.to_owned());
    vec![
        ("CARGO_TARGET_DIR", target_dir.as_os_str().to_owned()),
        ("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f").into()),
        ("RUSTFLAGS", OsString::new()),
    ]
}

/// Fails unless the tunnel's own functions are among the profile's busiest: a training run
/// that carried no traffic through the tunnel (or a profile of something else) would teach
/// the compiler the wrong code.
fn covers_the_tunnel(profdata: &Path, merged: &Path) -> anyhow::Result<()> {
    let top = cmd::output(
        profdata.to_str().context("non-UTF-8 path")?,
        &[
            "show",
            "--topn=300",
            merged.to_str().context("non-UTF-8 path")?,
        ],
    )?;
    let tunnel = top
        .lines()
        .filter(|l| l.contains("7gateway6tunnel"))
        .count();
    if tunnel == 0 {
        bail!(
            "the training profile {} has none of the tunnel's functions among its 300 \
             busiest: the training run did not exercise the tunnel",
            merged.display()
        );
    }
    eprintln!("profile: {tunnel} of the tunnel's functions among its 300 busiest");
    Ok(())
}

fn host_triple() -> anyhow::Result<String> {
    let version = cmd::output("rustc", &["-vV"])?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` names no host")
}

/// llvm-profdata of the toolchain that builds the gateway: the profile's format is that
/// toolchain's LLVM's. rustup's `llvm-tools` component has it; added when missing.
fn llvm_profdata(root: &Path, host: &str) -> anyhow::Result<PathBuf> {
    let sysroot = cmd::output("rustc", &["--print", "sysroot"])?;
    let tool = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !tool.is_file() {
        cmd::run("rustup".as_ref(), &["component", "add", "llvm-tools"], root)
            .context("adding rustup's llvm-tools component (it has llvm-profdata)")?;
    }
    if !tool.is_file() {
        bail!(
            "{} is missing after `rustup component add llvm-tools`",
            tool.display()
        );
    }
    Ok(tool)
}
