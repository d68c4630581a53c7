//! `raw_tp/count_memcg_events`: threshold crossings, seen at the charge that makes them.
//!
//! On cgroup v1 the kernel counts `PGPGIN` for every charge committed to a memcg (and `PGPGOUT`
//! for every uncharge) through `count_memcg_events(struct mem_cgroup *, item, val)`, after the
//! page counter moved and before the v1 threshold notifier runs: every charge, page cache and
//! kernel memory included, and never later than the eventfd. The tracepoint is new (about
//! 6.13) and fires about 2.6 times per faulted page (against about once for `rss_stat`), so
//! it is the crossing program on v1 where it exists, `rss_stat` elsewhere. The check is in
//! [`crate::crossing`].

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
