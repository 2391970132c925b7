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
    bootstrap::check_host()?;
    let host = host_triple()?;
    let profdata = llvm_profdata(root, &host)?;
    let dir = root.join("target/pgo");
    let profiles = dir.join("profiles");
    if profiles.exists() {
        std::fs::remove_dir_all(&profiles)
            .with_context(|| format!("removing the old profiles in {}", profiles.display()))?;
    }
    let gateway_release = [
        "--release",
        "--target",
        &host,
        "--package",
        "gateway",
        "--bin",
    ];

    cmd::step("PGO 1/3: the gateway, instrumented");
    let mut args = vec!["build"];
    args.extend(gateway_release);
    args.push("gateway");
    cmd::cargo_with_env(
        &args,
        root,
        &[
            ("CARGO_TARGET_DIR", dir.join("build").into_os_string()),
            (
                "RUSTFLAGS",
                rustflags(&format!("-Cprofile-generate={}", profiles.display())),
            ),
        ],
    )?;

    cmd::step("PGO 2/3: training run (gateway/examples/pgo_train.rs)");
    // The training client is not instrumented (its profile is not the gateway's) and is
    // built like the tests, with the dev profile.
    cmd::cargo(
        &["build", "--package", "gateway", "--example", "pgo_train"],
        root,
    )?;
    let instrumented = dir.join("build").join(&host).join("release/gateway");
    cmd::run(
        root.join("target/debug/examples/pgo_train").as_os_str(),
        &[instrumented.to_str().context("non-UTF-8 path")?],
        root,
    )?;
    let merged = dir.join("gateway.profdata");
    let merged_arg = merged.to_str().context("non-UTF-8 path")?;
    let profiles_arg = profiles.to_str().context("non-UTF-8 path")?;
    cmd::run(
        profdata.as_os_str(),
        &[
            "merge",
            "--failure-mode=all",
            "-o",
            merged_arg,
            profiles_arg,
        ],
        root,
    )?;

    cmd::step("PGO 3/3: the gateway, optimized with the profile");
    let mut args = vec!["build"];
    args.extend(gateway_release);
    args.push("gateway");
    cmd::cargo_with_env(
        &args,
        root,
        &[(
            "RUSTFLAGS",
            rustflags(&format!("-Cprofile-use={merged_arg}")),
        )],
    )?;
    let binary = root.join("target").join(&host).join("release/gateway");
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

/// `flag` after whatever RUSTFLAGS the caller set.
fn rustflags(flag: &str) -> std::ffi::OsString {
    match std::env::var("RUSTFLAGS") {
        Ok(outer) if !outer.trim().is_empty() => format!("{outer} {flag}").into(),
        _ => flag.into(),
    }
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
