//! `raw_tp/rss_stat`: a process's rss counters moved. Two jobs in one program, so the
//! tracepoint costs one run per event.
//!
//! The jobs are chosen by user space in `RSS_ROLES` after attaching (so a crossing program
//! that failed to attach can fall back to this one):
//!
//! - **Crossings** (kernel 5.5+, v1 and v2; the crossing program everywhere, joined on v1 by
//!   `count_memcg_events` while a guarded cgroup is near, on its `APPROACH` record sent from
//!   here): the event fires in the faulting task for anonymous, file and
//!   shmem faults, the charges that grow a cgroup to its OOM, so the current task's memory
//!   cgroup (`task->cgroups->subsys[memory]`) and its guarded ancestors are checked
//!   ([`crate::crossing`]). Page cache filled by `read`/`write` and kernel memory are charged
//!   without an rss change: the eventfd (v1) or the fallback (v2) sees those.
//! - **Scores**: the kernel fires `rss_stat(struct mm_struct *mm, int member, ...)` whenever it
//!   adds to one of an mm's counters, in the mm's own task or in another (fork's `dup_mmap`,
//!   reclaim and swap-out, `process_mrelease`, khugepaged...). The process is `mm->owner`
//!   (kept by the kernel with `CONFIG_MEMCG`), accepted only while `owner->mm == mm`: after
//!   `exec` or `exit_mm` an old mm's teardown updates nobody. Every update rewrites the whole
//!   score (all four counters, page tables, `oom_score_adj`).
//!
//! Most events change nothing either job could see: the shared counter the program reads
//! moves once per per-CPU batch of pages (6.2+), and a memcg's usage once per charge batch. So
//! the program first compares the counter with the value it saw last on this CPU for this mm
//! and returns when it has not moved: the scores then lag `/proc` by no more than the kernel's
//! own counter does. Once a guarded cgroup is near its thresholds (`near_bytes`), the crossing
//! check runs at every event of that mm instead, so a crossing is seen at the fault after the
//! charge that made it, as early as the v1 threshold notifier or earlier.

use aya_ebpf::{
    helpers::bpf_get_current_task, macros::raw_tracepoint, programs::RawTracePointContext,
};
use oomguard_common::rss_roles;

use crate::{
    RSS_MM, RSS_ROLES, crossing,
    kernel::{self, Result, offset},
};

#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_stat(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_rss_stat(&ctx);
    0
}

fn try_rss_stat(ctx: &RawTracePointContext) -> Result<()> {
    let (mm, member) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1) as u32);
    let (moved, slot) = kernel::mm_counter_moved(&RSS_MM, mm, member)?;
    if !moved && slot.near == 0 {
        return Ok(());
    }
    let roles = RSS_ROLES.get(0).copied().unwrap_or(0);
    // Crossings first: they are the latency that matters. A failure of one job does not
    // keep the other from running.
    let crossed = if roles & rss_roles::CROSSING != 0 {
        // SAFETY: a helper without arguments.
        let task = unsafe { bpf_get_current_task() };
        kernel::task_memcg(task)
            .and_then(|memcg| crossing::check_memcg(ctx, memcg, false))
            .map(|near| slot.near = u64::from(near))
    } else {
        Ok(())
    };
    if !moved {
        return crossed;
    }
    let scored = if roles & rss_roles::SCORES != 0 {
        score(mm)
    } else {
        Ok(())
    };
    crossed.and(scored)
}

fn score(mm: u64) -> Result<()> {
    let owner: u64 = kernel::read(mm, offset!(mm_owner))?;
    if owner == 0 || kernel::task_mm(owner)? != mm {
        return Ok(());
    }
    let tgid = kernel::task_tgid(owner)?;
    let score = kernel::task_score(owner, mm)?;
    kernel::store_score(tgid, &score)
}
