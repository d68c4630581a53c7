//! `raw_tp/sched_process_fork`: a new process gets its score.
//!
//! Fork copies the parent's page tables before this tracepoint fires, and the `rss_stat`
//! events of that copy may come before the new task is visible as `mm->owner`; so the child's
//! score is read here from its mm directly. Threads share their process's entry and are
//! skipped.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::kernel::{self, Result};

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_sched_process_fork(&ctx);
    0
}

fn try_sched_process_fork(ctx: &RawTracePointContext) -> Result<()> {
    let child = ctx.arg::<u64>(1);
    let tgid = kernel::task_tgid(child)?;
    if kernel::task_pid(child)? != tgid {
        return Ok(());
    }
    let mm = kernel::task_mm(child)?;
    if mm == 0 {
        return Ok(());
    }
    let score = kernel::task_score(child, mm)?;
    kernel::store_score(tgid, &score)
}
