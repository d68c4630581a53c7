//! `raw_tp/sched_process_exit`: a process is gone once its last thread exits.
//!
//! `sched_process_exit(struct task_struct *, bool group_dead)`: the entry is removed when the
//! whole thread group is dead, whichever thread exits last.

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
    let group_dead = ctx.arg::<u64>(1) & 0xff != 0;
    if !group_dead {
        return Ok(());
    }
    let tgid = kernel::task_tgid(ctx.arg::<u64>(0))?;
    // Absent when the process was never seen: nothing to do.
    let _ = TASKS.remove(tgid);
    Ok(())
}
