//! What a fresh machine needs before the eBPF crate builds: the nightly toolchain's rust-src
//! and a bpf-linker built against that toolchain's own libLLVM (../shared/TOOLCHAIN.md).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Where bpf-linker is installed, cached across builds of this checkout.
fn tools_dir(root: &Path) -> PathBuf {
    root.join("target/tools")
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    cmd::step("bootstrap");
    check_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker(root)
}

fn check_nightly() -> anyhow::Result<()> {
    let toolchains = cmd::output("rustup", &["toolchain", "list"])
        .context("rustup is required: install it from your distribution or rustup's installer")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly toolchain: the eBPF programs build with nightly \
             (`rustup toolchain install nightly`)"
        );
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("rust-src: installed for nightly");
        return Ok(());
    }
    cmd::run(
        "rustup".as_ref(),
        &["component", "add", "rust-src", "--toolchain", "nightly"],
        Path::new("."),
    )
}

fn ensure_bpf_linker(root: &Path) -> anyhow::Result<()> {
    let cached = tools_dir(root).join("bin/bpf-linker");
    if cached.is_file() {
        eprintln!("bpf-linker: {}", cached.display());
        return Ok(());
    }
    if let Some(found) = on_path("bpf-linker") {
        eprintln!("bpf-linker: {} (from PATH)", found.display());
        return Ok(());
    }
    eprintln!("bpf-linker: building it against nightly's libLLVM (once, under target/tools)");
    let sysroot = cmd::output("rustc", &["+nightly", "--print", "sysroot"])?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    let version = cmd::output("rustc", &["+nightly", "-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_owned();
    let llvm_prefix = tools_dir(root).join("llvm");
    let llvm_lib = llvm_prefix.join("lib");
    std::fs::create_dir_all(&llvm_lib)?;
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for link in [llvm_lib.join("libLLVM.so"), llvm_lib.join(soname)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let features = format!("llvm-{major}");
    let tools = tools_dir(root);
    let status = Command::new(cmd::cargo_bin())
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(&features)
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &llvm_prefix)
        .status()
        .context("starting cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status}); see the cargo output above");
    }
    let ldd = cmd::output("ldd", &[cached.to_str().context("non-UTF-8 path")?])?;
    if ldd.contains("not found") {
        bail!("bpf-linker cannot find its libraries:\n{ldd}");
    }
    Ok(())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// PATH with target/tools/bin first, for commands that link eBPF.
pub fn path_with_tools(root: &Path) -> anyhow::Result<OsString> {
    let mut dirs = vec![tools_dir(root).join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    Ok(std::env::join_paths(dirs)?)
}

pub fn is_root() -> bool {
    cmd::output("id", &["-u"]).is_ok_and(|u| u.trim() == "0")
}

/// What the gateway and its tests need from the host; each miss says what to do.
pub fn check_host() -> anyhow::Result<()> {
    let mut missing = kernel_misses();
    for tool in ["python3", "curl", "ip", "git", "nginx", "node", "setpriv"] {
        if on_path(tool).is_none() {
            missing.push(format!(
                "{tool}: the tests run it (Debian: apt-get install python3 curl iproute2 git \
                 nginx-light nodejs util-linux)"
            ));
        }
    }
    refuse("this host cannot run the tests", &missing)
}

/// What `gateway run` needs from the host kernel.
pub fn check_kernel() -> anyhow::Result<()> {
    refuse("this host cannot run the gateway", &kernel_misses())
}

fn kernel_misses() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push(
            "/sys/kernel/btf/vmlinux: use a kernel built with CONFIG_DEBUG_INFO_BTF=y".to_owned(),
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !mountinfo.lines().any(|l| l.contains(" - cgroup2 ")) {
        missing.push(
            "no cgroup v2 mount: `mount -t cgroup2 none /sys/fs/cgroup` or boot with \
             systemd.unified_cgroup_hierarchy=1"
                .to_owned(),
        );
    }
    missing
}

fn refuse(what: &str, missing: &[String]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    bail!("{what}:\n  {}", missing.join("\n  "))
}
