//! `/proc/cgroups`: the memory controller's hierarchy id (`memory_hierarchy_id`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::bpf::offsets::memory_hierarchy_id;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(id) = memory_hierarchy_id(&text) {
        assert_ne!(id, 0, "0 means no v1 hierarchy");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some("memory"))
        );
    }
});
