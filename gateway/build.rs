//! Builds `gateway-ebpf` with the nightly toolchain and bpf-linker, for embedding.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("gateway crate has no parent directory")?;
    let ebpf_dir = workspace.join("gateway-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("gateway-common").display()
    );

    // `cargo xtask bootstrap` builds bpf-linker here; a bpf-linker already on PATH also works.
    let tools = workspace.join("target/tools/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools.clone()];
    dirs.extend(env::split_paths(&path));
    if !dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        return Err(anyhow!(
            "bpf-linker not found (looked in {} and PATH): run `cargo xtask bootstrap`, \
             which builds it against the nightly toolchain's own libLLVM",
            tools.display()
        ));
    }
    let joined = env::join_paths(dirs)?;
    // SAFETY: build scripts are single-threaded; aya-build's child cargo inherits this PATH.
    unsafe { env::set_var("PATH", joined) };
    // The workspace's release LTO is for the userspace binary; bpf-linker links the eBPF
    // object itself, and the programs stay as the verifier has seen them.
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_PROFILE_RELEASE_LTO", "false") };

    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (needs `rustup component add rust-src --toolchain nightly`; `cargo xtask bootstrap` does it)")
}
