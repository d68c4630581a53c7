//! The library's private containerd ([`oomguard_dev::sandbox::containerd`]) with failures as
//! test panics.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::ops::Deref;
use std::path::Path;
use std::process::Output;

use oomguard_dev::sandbox::containerd as lib;
pub use oomguard_dev::sandbox::containerd::{container_id, probe};

pub struct Containerd(lib::Containerd);

impl Deref for Containerd {
    type Target = lib::Containerd;
    fn deref(&self) -> &lib::Containerd {
        &self.0
    }
}

impl Containerd {
    pub fn start(name: &str) -> Containerd {
        Containerd(lib::Containerd::start(name).unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        self.0.ctr(ns, args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn install(&self, id: &str, src: &Path, name: &str) {
        self.0
            .install(id, src, name)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn run(
        &self,
        ns: &str,
        id: &str,
        cgroup: &Path,
        limit: u64,
        labels: &[(&str, &str)],
        cmd: &[&str],
    ) {
        self.0
            .run(ns, id, cgroup, limit, labels, cmd)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
