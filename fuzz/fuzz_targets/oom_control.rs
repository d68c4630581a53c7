//! `memory.oom_control` (`OomControl::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::cgroup::OomControl;

fuzz_target!(|data: &[u8]| {
    let oc = OomControl::parse(&String::from_utf8_lossy(data));
    let rendered = format!(
        "oom_kill_disable {}\nunder_oom {}\noom_kill {}\n",
        u8::from(oc.oom_kill_disable),
        u8::from(oc.under_oom),
        oc.oom_kill
    );
    assert_eq!(OomControl::parse(&rendered), oc);
});
