//! `raw_tp/count_memcg_events`: threshold crossings, seen at the charge that makes them.
//!
//! On cgroup v1 the kernel counts `PGPGIN` for every charge committed to a memcg (and `PGPGOUT`
//! for every uncharge) through `count_memcg_events(struct mem_cgroup *, item, val)`, after the
//! page counter moved and before the v1 threshold notifier runs: every charge, page cache and
//! kernel memory included, and never later than the eventfd. The tracepoint is new (about
//! 6.13) and fires about 2.7 times per faulted page on every memcg of the node (against about
//! 1.3 times for `rss_stat`), so on v1 user space attaches it only while a guarded cgroup is
//! near its thresholds (`oomguard::bpf::on_demand`): `rss_stat` carries the crossings the
//! rest of the time. While attached, it also clears the `NEAR` bit of cgroups gone far again.
//! The check is in [`crate::crossing`].

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    crossing,
    kernel::{Result, offset},
};

#[raw_tracepoint(tracepoint = "count_memcg_events")]
pub fn memcg_pressure(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_memcg_pressure(&ctx);
    0
}

fn try_memcg_pressure(ctx: &RawTracePointContext) -> Result<()> {
    let item = ctx.arg::<u64>(1) as u32;
    if item != offset!(pgpgin) && item != offset!(pgpgout) {
        return Ok(());
    }
    crossing::check_memcg(ctx, ctx.arg::<u64>(0), true).map(drop)
}
