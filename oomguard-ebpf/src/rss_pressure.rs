//! `raw_tp/rss_stat`: threshold crossings, seen at the page faults that charge (kernel 5.5+).
//!
//! `rss_stat(struct mm_struct *, int member, ...)` fires whenever one of an mm's rss counters
//! is added to: in the faulting task itself for anonymous, file and shmem faults, the charges
//! that grow a cgroup to its OOM. The program checks the current task's memory cgroup
//! (`task->cgroups->subsys[memory]`, on v1 and v2 alike) and its guarded ancestors
//! ([`crate::crossing`]). Page cache filled by `read`/`write`, and kernel memory, are charged
//! without an rss change: the eventfd (v1) or the fallback (v2) sees those.
//!
//! Most events change nothing the check could see: the shared counter the program reads moves
//! once per per-CPU batch of pages (6.2+), and a memcg's usage once per charge batch. So the
//! program first compares the counter with the value it saw last on this CPU for this mm and
//! returns when it has not moved.

use aya_ebpf::{
    helpers::bpf_get_current_task, macros::raw_tracepoint, programs::RawTracePointContext,
};

use crate::{
    PRESSURE_MM, crossing,
    kernel::{self, Result},
};

#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_pressure(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_rss_pressure(&ctx);
    0
}

fn try_rss_pressure(ctx: &RawTracePointContext) -> Result<()> {
    let (mm, member) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1) as u32);
    if !kernel::mm_counter_moved(&PRESSURE_MM, mm, member)? {
        return Ok(());
    }
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    crossing::check_memcg(ctx, kernel::task_memcg(task)?)
}
