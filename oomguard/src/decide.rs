//! The decision rule, as pure functions over plain numbers: act only where the kernel would
//! have to act soon, and only with a kill that can help.
//!
//! - **Pressing**: usage is at the kill threshold *and* what the kernel cannot reclaim
//!   without killing (usage minus the file pages on the LRU, which reclaim can always write
//!   back and drop) is at the kill threshold too. A cgroup doing file I/O sits at its limit
//!   whatever its anonymous share; only the unreclaimable part says the kernel is about to
//!   run out of reclaim and kill.
//! - **A kill that can help**: the candidate frees (its anonymous memory and page tables;
//!   shared file and tmpfs pages stay charged after it dies) more than the overshoot of the
//!   unreclaimable part above the kill threshold. Killing an idle task in a cgroup held up
//!   by tmpfs frees nothing and is not made.
//! - **Hysteresis**: an episode ends only when usage falls a band below the kill threshold,
//!   not one page below it: per-CPU charge batching makes usage jitter by pages × CPUs.

use std::time::Duration;

pub const PAGE_SIZE: u64 = 4096;
/// Pages a CPU charges to a memcg in one batch (the kernel's `MEMCG_CHARGE_BATCH`): usage
/// read from user space is off by up to this per CPU.
pub const CHARGE_BATCH_PAGES: u64 = 64;

/// Where a cgroup stands against its kill threshold, from one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Usage below the kill threshold.
    Below,
    /// Usage at the kill threshold, but the kernel can still reclaim enough file cache to
    /// stay below its limit: `headroom` more unreclaimable bytes before it cannot.
    Reclaimable { headroom: u64 },
    /// The unreclaimable part is at the kill threshold: the kernel would have to kill soon.
    /// `overshoot` is how far above the threshold it is.
    Pressing { overshoot: u64 },
}

/// What the kernel could not reclaim without killing: usage minus reclaimable file cache.
pub fn unreclaimable(usage: u64, reclaimable_cache: u64) -> u64 {
    usage.saturating_sub(reclaimable_cache)
}

/// How far `memory.stat`'s counters may trail the charges: the kernel folds per-CPU
/// updates into them only once more than `MEMCG_CHARGE_BATCH` × CPUs pages are pending
/// (`memcg_vmstats_needs_flush`), so a cgroup writing files can show up to that much less
/// page cache than it holds, and its unreclaimable part that much too high.
pub fn stat_lag(cpus: u64) -> u64 {
    CHARGE_BATCH_PAGES * PAGE_SIZE * cpus.max(1)
}

/// The rule for one reading of usage and reclaimable file cache. `stat_lag`
/// ([`stat_lag`]): where the cgroup holds file cache, its counters may trail by this much,
/// so the unreclaimable part must be at the threshold by more than the lag (at most the
/// cache it could be hiding) before the kernel is taken to be out of reclaim. Without file
/// cache nothing is discounted: an anonymous grower is judged on usage alone, as before.
pub fn pressure(
    usage: u64,
    reclaimable_cache: u64,
    kill_threshold: u64,
    stat_lag: u64,
) -> Pressure {
    if usage < kill_threshold {
        return Pressure::Below;
    }
    let hard = unreclaimable(usage, reclaimable_cache);
    let surely = hard.saturating_sub(reclaimable_cache.min(stat_lag));
    if surely < kill_threshold {
        Pressure::Reclaimable {
            headroom: kill_threshold - surely,
        }
    } else {
        Pressure::Pressing {
            overshoot: hard - kill_threshold,
        }
    }
}

/// Whether killing a candidate that frees `freeable` bytes helps: it brings the
/// unreclaimable part back under the kill threshold, or it gives back at least half a
/// margin (many tasks growing together: no single one covers the overshoot, but each kill
/// holds the limit off as the kernel's own would). A kill that does neither (an idle task
/// in a cgroup held up by tmpfs) is not made.
pub fn can_help(freeable: u64, overshoot: u64, margin: u64) -> bool {
    freeable > overshoot || freeable >= (margin / 2).max(1)
}

/// The band below the kill threshold usage must fall into before an episode ends: a
/// quarter of the margin, and at least the per-CPU charge batches of every CPU.
pub fn hysteresis(margin: u64, cpus: u64) -> u64 {
    (margin / 4).max(CHARGE_BATCH_PAGES * PAGE_SIZE * cpus.max(1))
}

/// When to look again at a cgroup whose cache the kernel can still reclaim. Nothing signals
/// growth of its unreclaimable part (usage stays at the limit), so it is polled, as often
/// as the fastest growth seen (`growth_per_s`, or `assumed_per_s` when none was) could
/// use up half the headroom, within `[min, max]`.
pub fn recheck_after(
    headroom: u64,
    growth_per_s: u64,
    assumed_per_s: u64,
    min: Duration,
    max: Duration,
) -> Duration {
    let rate = growth_per_s.max(assumed_per_s).max(1);
    let secs = (headroom / 2) as f64 / rate as f64;
    Duration::from_secs_f64(secs.min(max.as_secs_f64())).clamp(min, max.max(min))
}

/// Growth of the unreclaimable part between two readings `dt` apart, in bytes per second,
/// beyond `noise` (0 when it grew by no more than that). Each reading can be off by the
/// counters' lag and the per-CPU charge batches, so a difference below twice the lag
/// ([`growth_noise`]) says nothing: a cgroup doing file I/O at a steady anonymous level shows
/// such jumps, one reading in thirty.
pub fn growth_rate(before: u64, after: u64, dt: Duration, noise: u64) -> u64 {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (after.saturating_sub(before).saturating_sub(noise) as f64 / secs) as u64
}

/// What a difference of two unreclaimable readings can show without any growth: each
/// reading's file counters may trail by the lag (at most the cache they count), and usage
/// itself jitters by the charge batches.
pub fn growth_noise(reclaimable_cache: u64, stat_lag: u64) -> u64 {
    2 * reclaimable_cache.min(stat_lag)
}

/// How far ahead growth of the unreclaimable part is projected. Nothing signals that growth
/// while usage sits at the limit (the kernel reclaims the cache under it), and a task
/// allocating at 1 GB/s uses a few MiB of cache in a few ms: re-checking at 1 ms, a cgroup
/// whose measured growth uses up its headroom within this horizon is acted on now, as the
/// kernel would have to act before the next re-check or the one after.
pub const ACT_HORIZON: Duration = Duration::from_millis(4);

/// Whether unreclaimable memory growing at `growth_per_s` (measured, beyond the noise) uses
/// up `headroom` within `horizon`.
pub fn runs_out_within(headroom: u64, growth_per_s: u64, horizon: Duration) -> bool {
    growth_per_s > 0 && headroom as f64 <= growth_per_s as f64 * horizon.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn a_cache_heavy_cgroup_at_its_limit_is_not_pressing() {
        // Issue 14's first reproduction: 90% of 256 MiB anonymous, dd filling the rest.
        let kill = 256 * M - 5 * M;
        let p = pressure(256 * M, 25 * M, kill, 0);
        assert_eq!(
            p,
            Pressure::Reclaimable {
                headroom: kill - 231 * M
            }
        );
    }

    #[test]
    fn unreclaimable_memory_at_the_threshold_is_pressing() {
        let kill = 230 * M;
        assert_eq!(pressure(229 * M, 0, kill, LAG), Pressure::Below);
        assert_eq!(
            pressure(232 * M, M, kill, 0),
            Pressure::Pressing { overshoot: M }
        );
        assert_eq!(
            pressure(kill, 0, kill, LAG),
            Pressure::Pressing { overshoot: 0 },
            "exactly at the threshold counts"
        );
    }

    #[test]
    fn cache_no_longer_covering_the_overshoot_is_pressing() {
        let kill = 100 * M;
        // 101 MiB used, 2 MiB of it cache: 99 MiB the kernel cannot reclaim.
        assert!(matches!(
            pressure(101 * M, 2 * M, kill, 0),
            Pressure::Reclaimable { headroom } if headroom == M
        ));
        assert!(matches!(
            pressure(103 * M, 2 * M, kill, 0),
            Pressure::Pressing { overshoot } if overshoot == M
        ));
    }

    const LAG: u64 = 512 << 10;

    #[test]
    fn file_cache_the_counters_may_hide_is_discounted() {
        // 96% of 256 MiB anonymous and a writer at 100 MB/s (2-CPU host, 2% margin): the
        // unreclaimable part read 250.24 MiB at the median, and one reading in thirty was
        // up to 1 MiB higher, past the 250.88 MiB threshold. The kernel killed nobody.
        let kill = 263_065_600;
        let cache = 3 * M;
        assert_eq!(
            pressure(kill + cache + LAG / 2, cache, kill, LAG),
            Pressure::Reclaimable { headroom: LAG / 2 },
            "within the lag: left to the kernel"
        );
        assert_eq!(
            pressure(kill + cache + LAG, cache, kill, LAG),
            Pressure::Pressing { overshoot: LAG },
            "beyond it: pressing, the overshoot counted in full"
        );
        // No file cache: nothing can hide, usage alone decides (an anonymous grower).
        assert_eq!(
            pressure(kill, 0, kill, LAG),
            Pressure::Pressing { overshoot: 0 }
        );
        // A little cache hides at most itself.
        assert_eq!(
            pressure(kill + 2 * 4096, 4096, kill, LAG),
            Pressure::Pressing { overshoot: 4096 }
        );
        assert_eq!(
            pressure(kill + 4096, 4096, kill, LAG),
            Pressure::Reclaimable { headroom: 4096 }
        );
        assert_eq!(stat_lag(2), LAG);
    }

    #[test]
    fn absurd_cache_saturates() {
        assert!(matches!(
            pressure(10 * M, u64::MAX, M, 0),
            Pressure::Reclaimable { headroom } if headroom == M
        ));
    }

    #[test]
    fn a_kill_helps_only_when_it_frees_more_than_the_overshoot() {
        // Issue 14's second reproduction: an idle task (a few hundred KiB anonymous) in a
        // cgroup held 2 MiB above its threshold by tmpfs.
        let margin = 5 * M;
        assert!(!can_help(300 << 10, 2 * M, margin));
        assert!(can_help(200 * M, 2 * M, margin));
        assert!(!can_help(2 * M, 2 * M, margin));
        assert!(can_help(1, 0, margin));
        // Fifty tasks of 5 MiB growing together, 8 MiB over: each kill holds the limit off.
        assert!(can_help(5 * M, 8 * M, margin));
    }

    #[test]
    fn hysteresis_covers_the_charge_batches() {
        assert_eq!(hysteresis(20 * M, 2), 5 * M);
        // A 1 MiB margin on 64 CPUs: 64 × 256 KiB.
        assert_eq!(hysteresis(M, 64), 16 * M);
        assert_eq!(hysteresis(0, 0), 256 << 10);
    }

    #[test]
    fn recheck_interval_follows_headroom_and_growth() {
        let min = Duration::from_millis(50);
        let max = Duration::from_secs(1);
        // Steady (no growth seen), 20 MiB of headroom, 100 MiB/s assumed: 100 ms.
        assert_eq!(
            recheck_after(20 * M, 0, 100 * M, min, max),
            Duration::from_millis(100)
        );
        // Lots of headroom: the bound.
        assert_eq!(recheck_after(1 << 40, 0, 100 * M, min, max), max);
        // Fast growth seen: the floor.
        assert_eq!(recheck_after(20 * M, 10_000 * M, 100 * M, min, max), min);
        assert_eq!(recheck_after(0, 0, 0, min, max), min);
    }

    #[test]
    fn growth_is_never_negative() {
        assert_eq!(growth_rate(10 * M, 5 * M, Duration::from_secs(1), 0), 0);
        assert_eq!(
            growth_rate(0, 10 * M, Duration::from_millis(500), 0),
            20 * M
        );
        assert_eq!(growth_rate(0, 10 * M, Duration::ZERO, 0), 0);
    }

    #[test]
    fn growth_within_the_noise_is_none() {
        let noise = growth_noise(3 * M, LAG);
        assert_eq!(noise, 2 * LAG);
        assert_eq!(
            growth_noise(4096, LAG),
            8192,
            "a little cache hides at most itself"
        );
        // A reading one lag high, 1 ms after the last: no growth.
        assert_eq!(growth_rate(250 * M, 250 * M + LAG, MS, noise), 0);
        // 5 MiB in 5 ms (a task allocating at 1 GB/s): 4 MiB of it beyond the noise.
        assert_eq!(growth_rate(240 * M, 245 * M, 5 * MS, noise), 800 * M);
    }

    #[test]
    fn the_projection_acts_only_on_measured_growth() {
        // 3.4 MiB of cache left to reclaim, at 800 MiB/s: gone in about 4 ms.
        assert!(runs_out_within(3 * M, 800 * M, ACT_HORIZON));
        assert!(!runs_out_within(4 * M, 800 * M, ACT_HORIZON));
        // Nothing measured: never projected, however little headroom.
        assert!(!runs_out_within(0, 0, ACT_HORIZON));
        // Bursts of 60 MiB at 1 GB/s over 150 MiB of anonymous memory in 256 MiB: 40 MiB
        // of headroom left at their peak.
        assert!(!runs_out_within(40 * M, 1024 * M, ACT_HORIZON));
    }

    const MS: Duration = Duration::from_millis(1);
}
