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
    let entries: Vec<(&str, u64)> = stat.iter().collect();
    for (k, v) in &entries {
        let first = entries.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
        assert_eq!(Some(stat.get(k)), first, "{k} {v}");
    }
    // What was parsed, written back the kernel's way, parses to the same entries.
    let rendered: String = entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let again = MemStat::parse(&rendered);
    assert_eq!(again.iter().collect::<Vec<_>>(), entries);
});
