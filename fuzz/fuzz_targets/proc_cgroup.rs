//! `/proc/PID/cgroup`: the memory cgroup line (`memory_cgroup_of`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::cgroup::memory_cgroup_of;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(path) = memory_cgroup_of(&text) {
        let lines = || {
            text.lines().filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, ctrls, rest) = (parts.next(), parts.next()?, parts.next()?);
                Some((ctrls, rest))
            })
        };
        let names_memory = |c: &str| c.split(',').any(|c| c == "memory");
        // The path is the rest of a line whose controller list names `memory`, or, when no
        // line does (cgroup v2), of the unified `0::` line.
        if lines().any(|(c, _)| names_memory(c)) {
            assert!(lines().any(|(c, rest)| rest == path && names_memory(c)));
        } else {
            assert!(lines().any(|(c, rest)| rest == path && c.is_empty()));
        }
    }
});
