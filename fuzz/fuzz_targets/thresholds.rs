//! The margin flags as the CLI takes them (`--min-margin MIN --max-margin MAX --margin-ratio
//! R`, through clap and `RunArgs::validate`) and a `memory.limit_in_bytes`: input text
//! `MIN MAX R LIMIT`. Whatever passes validation must give page-aligned thresholds inside the
//! limit, with the margin clamped between MIN and MAX.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use oomguard::cli::args::{Cli, Command};

const PAGE: u64 = 4096;

/// A directory that passes `--root` validation (it has a readable `memory.limit_in_bytes`).
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join("oomguard-fuzz-root");
        std::fs::create_dir_all(&dir).expect("making the fake --root");
        std::fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n")
            .expect("writing the fake memory.limit_in_bytes");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let words: Vec<&str> = text.split_whitespace().collect();
    let [min, max, ratio, limit] = words[..] else {
        return;
    };
    // As `cgroup::read_u64` reads the limit.
    let Ok(limit) = limit.parse::<u64>() else {
        return;
    };
    let args = [
        "oomguard",
        "run",
        "--root",
        root().to_str().expect("a UTF-8 temp dir"),
        "--min-margin",
        min,
        "--max-margin",
        max,
        "--margin-ratio",
        ratio,
    ];
    let Ok(Cli {
        command: Command::Run(run),
    }) = Cli::try_parse_from(args)
    else {
        return;
    };
    let Ok(config) = run.validate("host") else {
        return;
    };
    let m = config.margins;
    let margin = m.margin(limit);
    assert!(
        m.min <= margin && margin <= m.max,
        "{m:?} {limit}: margin {margin}"
    );
    match m.thresholds(limit) {
        Some(t) => {
            assert_eq!((t.limit, t.margin), (limit, margin));
            assert_eq!(t.kill % PAGE, 0, "{t:?}");
            assert_eq!(t.reclaim % PAGE, 0, "{t:?}");
            assert!(PAGE <= t.reclaim && t.reclaim <= t.kill, "{t:?}");
            assert!(
                t.kill <= limit - margin && limit - margin - t.kill < PAGE,
                "{t:?}"
            );
        }
        None => assert!(
            limit.checked_sub(margin).is_none_or(|room| room < PAGE),
            "{m:?} left {limit} unguarded"
        ),
    }
});
