//! `/proc/self/mounts`: mount points by filesystem type (`targets_of`) and where tracefs is
//! (`tracefs_mount`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::bpf::{mount::targets_of, tracefs::tracefs_mount};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for fstype in ["tracefs", "bpf", "cgroup"] {
        for target in targets_of(&text, fstype) {
            assert!(text.contains(target));
        }
    }
    if let Some(path) = tracefs_mount(&text) {
        let path = path.to_string_lossy();
        assert!(path == "/sys/kernel/tracing" || path == "/sys/kernel/debug/tracing");
        assert!(targets_of(&text, "tracefs").contains(&path.as_ref()));
    }
});
