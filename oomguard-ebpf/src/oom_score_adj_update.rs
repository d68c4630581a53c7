//! `raw_tp/oom_score_adj_update`: a process's `oom_score_adj` changed.
//!
//! Fires for the task written through `/proc/PID/oom_score_adj` and for every other process
//! sharing its mm; the value lives in the thread group's `signal_struct`.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::kernel::{self, Result};

#[raw_tracepoint(tracepoint = "oom_score_adj_update")]
pub fn oom_score_adj_update(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_oom_score_adj_update(&ctx);
    0
}

fn try_oom_score_adj_update(ctx: &RawTracePointContext) -> Result<()> {
    let task = ctx.arg::<u64>(0);
    let mm = kernel::task_mm(task)?;
    if mm == 0 {
        return Ok(());
    }
    let tgid = kernel::task_tgid(task)?;
    let score = kernel::task_score(task, mm)?;
    kernel::store_score(tgid, &score)
}
