//! `cargo xtask run`: the guard at work on a throw-away sandbox cgroup (see [`oomguard_dev::demo`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    oomguard_dev::demo::main(oomguard_dev::demo::DemoArgs::parse())
}
