//! Idempotent installation of what the build and tests need. Each step checks first and
//! only installs what is missing.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{exec, step};

/// Debian packages: LLVM 22 for bpf-linker, bpftool for looking at loaded programs,
/// protoc for the containerd API, and a real containerd, runc and a static busybox (the
/// container rootfs) for the runtime tests; Prometheus (with promtool) for the scrape,
/// alert-rule and dashboard tests; qemu, kmod (module dependencies) and e2fsprogs (the
/// guest's disk) for the kernel matrix's guests.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "protobuf-compiler",
    "containerd",
    "runc",
    "busybox-static",
    "prometheus",
    "qemu-system-x86",
    "kmod",
    "e2fsprogs",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect()
}

fn has_rust_src() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .lines()
    .any(|l| l.starts_with("rust-src"))
}

fn has_bpf_linker() -> bool {
    output(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION)
}

/// Installs what is missing. With `verbose`, also says what is already there.
pub fn run(verbose: bool) -> Result<()> {
    let packages = missing_packages();
    if packages.is_empty() {
        if verbose {
            step(&format!("apt packages present: {}", APT_PACKAGES.join(" ")));
        }
    } else {
        if !is_root() {
            bail!(
                "missing apt packages {} and not root: run `sudo cargo xtask setup`",
                packages.join(" ")
            );
        }
        step(&format!("installing apt packages: {}", packages.join(" ")));
        exec(Command::new("apt-get").args(["update", "-q"]))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !quiet(Command::new("rustup").args(["toolchain", "list"])) {
        bail!("rustup is needed (the eBPF programs build with its nightly toolchain)");
    }
    if has_rust_src() {
        if verbose {
            step("rust-src for nightly present");
        }
    } else {
        step("installing rust-src for the nightly toolchain (eBPF builds core from source)");
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if has_bpf_linker() {
        if verbose {
            step(&format!("bpf-linker {BPF_LINKER_VERSION} present"));
        }
    } else {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        ));
        exec(
            crate::cargo()
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )
        .context("installing bpf-linker")?;
        if !has_bpf_linker() {
            bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
        }
    }
    if verbose {
        step("setup complete");
    }
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}
