//! `/proc/PID/cgroup`: the memory cgroup line (`memory_cgroup_of`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::cgroup::memory_cgroup_of;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(path) = memory_cgroup_of(&text) {
        // The path is the rest of a line whose controller list names `memory`.
        assert!(text.lines().any(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, rest) = (parts.next(), parts.next(), parts.next());
            rest == Some(path) && ctrls.is_some_and(|c| c.split(',').any(|c| c == "memory"))
        }));
    }
});
