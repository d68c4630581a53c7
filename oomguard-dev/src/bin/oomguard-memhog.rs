//! A memory hog whose rate the caller controls: anonymous memory (`--rate`, `--total`) or
//! page cache (`--file`). Used by the demo (`cargo xtask run`), the tests and the benchmarks.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use oomguard::size::Size;

#[derive(Debug, Parser)]
#[command(
    name = "oomguard-memhog",
    about = "Allocate memory at a controlled rate"
)]
struct Args {
    /// Bytes per second (bare number = MiB); 0 means as fast as possible.
    #[arg(long, default_value = "0")]
    rate: Size,
    /// Stop allocating after this much.
    #[arg(long, default_value = "1G")]
    total: Size,
    /// Allocation step.
    #[arg(long, default_value = "1M")]
    chunk: Size,
    /// Write this file instead (page cache, not anonymous memory).
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Set our own oom_score_adj first.
    #[arg(long, allow_hyphen_values = true)]
    adj: Option<i32>,
    /// Touch each chunk with one memset (as fast as the kernel hands out pages) instead of
    /// a byte loop, which in a debug build allocates at about 140 MB/s.
    #[arg(long)]
    fast: bool,
    /// Seconds to hold the memory after reaching --total.
    #[arg(long, default_value_t = 3600)]
    hold: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(adj) = args.adj
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string())
    {
        eprintln!("oomguard-memhog: cannot set oom_score_adj {adj}: {e}");
        return ExitCode::from(2);
    }
    let chunk = args.chunk.bytes().max(4096) as usize;
    let total = args.total.bytes() as usize;
    let rate = args.rate.bytes() as f64;
    let step = if rate > 0.0 {
        Duration::from_secs_f64(chunk as f64 / rate)
    } else {
        Duration::ZERO
    };
    let mut next = Instant::now();
    let mut done = 0usize;
    let mut file = match &args.file {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("oomguard-memhog: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let buf = vec![0x5au8; chunk];
    let mut keep: Vec<Vec<u8>> = Vec::new();
    while done < total {
        match &mut file {
            Some(f) => {
                if let Err(e) = f.write_all(&buf) {
                    eprintln!("oomguard-memhog: write: {e}");
                    return ExitCode::from(1);
                }
            }
            // Touch every page so it is really charged to the cgroup.
            None if args.fast => keep.push(vec![1u8; chunk]),
            None => {
                let mut v: Vec<u8> = Vec::with_capacity(chunk);
                v.resize(chunk, 1);
                keep.push(v);
            }
        }
        done += chunk;
        if rate > 0.0 {
            // Pace each chunk from the previous deadline, never from the start: after a
            // stall the hog must not catch up in a burst faster than --rate.
            next = next.max(Instant::now()) + step;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    std::hint::black_box(&keep);
    std::thread::sleep(Duration::from_secs(args.hold));
    ExitCode::SUCCESS
}
