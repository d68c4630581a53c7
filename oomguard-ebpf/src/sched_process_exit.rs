//! `raw_tp/sched_process_exit`: a process is gone once its last thread exits.
//!
//! `sched_process_exit(struct task_struct *, ...)` (6.16+ adds `bool group_dead`; older
//! kernels have the task only): the entry is removed when the whole thread group is dead,
//! whichever thread exits last, told by `signal->live` (which `do_exit` has already
//! decremented), the same on every kernel.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    TASKS,
    kernel::{self, Result},
};

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_exit(ctx: &RawTracePointContext) -> Result<()> {
    let task = ctx.arg::<u64>(0);
    if !kernel::group_dead(task)? {
        return Ok(());
    }
    let tgid = kernel::task_tgid(task)?;
    // Absent when the process was never seen: nothing to do.
    let _ = TASKS.remove(tgid);
    Ok(())
}
