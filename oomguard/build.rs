//! Builds the eBPF programs in `../oomguard-ebpf` with aya-build and leaves the object at
//! `$OUT_DIR/oomguard-ebpf`, which `src/bpf.rs` embeds.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` on PATH. `AYA_BUILD_SKIP=1`
//! skips the eBPF build (aya-build's own switch); an empty placeholder object is written instead
//! so that `cargo check`/`clippy` work without the eBPF toolchain, but loading then fails.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "oomguard-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let workspace_dir = PathBuf::from(manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("the oomguard crate has no parent directory"))?
        .to_path_buf();
    let ebpf_dir = workspace_dir.join(EBPF_PACKAGE);
    // aya-build watches the eBPF crate; its path dependency on the common crate needs watching too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace_dir.join("oomguard-common").display()
    );
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_PACKAGE);
    if skip_requested() && !object.exists() {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }

    // aya-build runs `cargo build --package oomguard-ebpf` in the current directory, and the
    // eBPF crate is excluded from our workspace: run it from the crate's own directory, where it
    // is its own workspace root (own profile, own lock file, nightly + bpfel target).
    env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("changing directory to {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn skip_requested() -> bool {
    env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
