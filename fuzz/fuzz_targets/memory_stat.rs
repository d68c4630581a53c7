//! `memory.stat` (`MemStat::parse`) and the reclaimable cache the policy reads from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::cgroup::MemStat;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let stat = MemStat::parse(&text);
    let cache = stat.reclaimable_cache();
    assert!(cache >= stat.get("total_inactive_file"));
    assert!(cache >= stat.get("total_active_file"));
    // What was parsed, written back the kernel's way, parses to the same map.
    let rendered: String = stat.0.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    assert_eq!(MemStat::parse(&rendered), stat);
});
