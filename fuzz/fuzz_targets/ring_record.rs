//! Ring-buffer records from the eBPF programs (`Record::decode`): any bytes, any length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::bpf::Record;
use oomguard_common::CGROUP_PATH_MAX;

fuzz_target!(|data: &[u8]| {
    if let Some(record) = Record::decode(data) {
        let _ = record.ktime_ns();
        if let Record::CgroupMkdir(dir) | Record::CgroupRmdir(dir) = &record {
            assert!(dir.path.as_os_str().len() <= CGROUP_PATH_MAX);
        }
    }
});
