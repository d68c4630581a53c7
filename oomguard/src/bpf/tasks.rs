//! Seeding the `TASKS` map from `/proc`: the processes that existed before the programs were
//! attached (later ones are added by the fork and rss programs).

use oomguard_common::TaskScore;

/// The score of one process from its `/proc/PID/status` and `oom_score_adj`; `None` for kernel
/// threads and zombies (no mm: no `RssAnon` line).
pub fn score_from_status(status: &str, oom_score_adj: &str) -> Option<TaskScore> {
    let mut score = TaskScore::default();
    let mut has_mm = false;
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = || {
            value
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .map_or(0, |n| n * 1024)
        };
        match key {
            "RssAnon" => {
                score.rss_anon = kib();
                has_mm = true;
            }
            "RssFile" => score.rss_file = kib(),
            "RssShmem" => score.rss_shmem = kib(),
            "VmSwap" => score.swap = kib(),
            "VmPTE" => score.pgtables = kib(),
            _ => {}
        }
    }
    score.oom_score_adj = oom_score_adj.trim().parse().ok()?;
    has_mm.then_some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_process() {
        let status = "Name:\tmemhog\nState:\tS (sleeping)\nVmRSS:\t  10248 kB\n\
                      RssAnon:\t   8192 kB\nRssFile:\t   2048 kB\nRssShmem:\t      8 kB\n\
                      VmPTE:\t     60 kB\nVmSwap:\t     16 kB\n";
        assert_eq!(
            score_from_status(status, "-500\n"),
            Some(TaskScore {
                rss_anon: 8192 * 1024,
                rss_file: 2048 * 1024,
                rss_shmem: 8 * 1024,
                swap: 16 * 1024,
                pgtables: 60 * 1024,
                oom_score_adj: -500,
                ..TaskScore::default()
            })
        );
    }

    #[test]
    fn skips_kernel_threads() {
        assert_eq!(score_from_status("Name:\tkthreadd\nState:\tS\n", "0"), None);
    }
}
