//! `raw_tp/rss_stat`: a process's rss counters moved.
//!
//! The kernel fires `rss_stat(struct mm_struct *mm, int member)` whenever it adds to one of an
//! mm's counters, in the mm's own task (`curr` in the tracepoint record) or in another
//! (`curr == 0`: fork's `dup_mmap`, reclaim and swap-out, `process_mrelease`, khugepaged...).
//! The raw tracepoint gives the mm itself, so both cases are handled the same way: the process
//! is `mm->owner` (kept by the kernel with `CONFIG_MEMCG`), accepted only while
//! `owner->mm == mm`: after `exec` or `exit_mm` an old mm's teardown updates nobody. Every
//! event rewrites the whole score (all four counters, page tables, `oom_score_adj`).

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    SCORES_MM,
    kernel::{self, Result, offset},
};

#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_stat(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_rss_stat(&ctx);
    0
}

fn try_rss_stat(ctx: &RawTracePointContext) -> Result<()> {
    let (mm, member) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1) as u32);
    if !kernel::mm_counter_moved(&SCORES_MM, mm, member)? {
        return Ok(());
    }
    let owner: u64 = kernel::read(mm, offset!(mm_owner))?;
    if owner == 0 || kernel::task_mm(owner)? != mm {
        return Ok(());
    }
    let tgid = kernel::task_tgid(owner)?;
    let score = kernel::task_score(owner, mm)?;
    kernel::store_score(tgid, &score)
}
