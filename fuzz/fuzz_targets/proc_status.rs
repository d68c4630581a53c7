//! `/proc/PID/status` (`parse_status`) and the score computed from it (`badness`).
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use oomguard::victim::{Task, badness, parse_status};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let st = parse_status(&text);
    let has_rss = text.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| matches!(k, "RssAnon" | "RssFile" | "RssShmem"))
    });
    assert_eq!(st.has_mm, has_rss);

    // Written back the kernel's way (kB), it parses to the same.
    if [st.rss_bytes, st.anon_bytes, st.swap_bytes, st.pgtables_bytes]
        .iter()
        .all(|b| b % 1024 == 0)
        && st.anon_bytes <= st.rss_bytes
    {
        let mut rendered = format!(
            "Name:\t{}\nState:\t{} (x)\nVmPTE:\t{} kB\nVmSwap:\t{} kB\n",
            st.name,
            st.state,
            st.pgtables_bytes / 1024,
            st.swap_bytes / 1024
        );
        if st.has_mm {
            rendered.push_str(&format!(
                "RssAnon:\t{} kB\nRssFile:\t{} kB\n",
                st.anon_bytes / 1024,
                (st.rss_bytes - st.anon_bytes) / 1024
            ));
        }
        assert_eq!(parse_status(&rendered), st, "{rendered:?}");
    }

    // The score of such a task, for limits from a page to "unlimited", with every adj.
    for (limit, adj) in [
        (4096, -999),
        (1 << 30, 0),
        (u64::MAX, 1000),
        (1 << 62, -1000),
    ] {
        let task = Task {
            pid: 1,
            comm: st.name.clone(),
            cgroup: PathBuf::new(),
            rss_bytes: st.rss_bytes,
            anon_bytes: st.anon_bytes,
            swap_bytes: st.swap_bytes,
            pgtables_bytes: st.pgtables_bytes,
            oom_score_adj: adj,
            start_time: 0,
            exiting: false,
        };
        let _ = badness(&task, limit);
    }
});
