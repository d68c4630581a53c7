//! `raw_tp/mark_victim`: the kernel's OOM killer chose a victim.
//!
//! `mark_victim(struct task_struct *, uid_t)` fires before the victim is killed, while its mm
//! is still attached, so the record carries its rss and `oom_score_adj` as the kernel scored
//! them, and the v1 memory cgroup it was in (with that cgroup's usage).

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use aya_log_ebpf::warn;
use oomguard_common::{Event, kind};

use crate::kernel::{self, Result};

#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn mark_victim(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_mark_victim(&ctx);
    0
}

fn try_mark_victim(ctx: &RawTracePointContext) -> Result<()> {
    let page = kernel::page_size()?;
    let task = ctx.arg::<u64>(0);
    let mut event = Event {
        kind: kind::KERNEL_OOM_VICTIM,
        pid: kernel::task_tgid(task)?,
        ktime_ns: kernel::now_ns(),
        ..Event::default()
    };
    // The record goes out even when a part cannot be read: the kill is the news.
    if let Ok(memcg) = kernel::task_memcg(task) {
        event.cgroup_id = kernel::memcg_id(memcg).unwrap_or(0);
        if let Ok((usage, max)) = kernel::memcg_usage_and_max(memcg) {
            event.usage_bytes = usage * page;
            event.threshold_bytes = kernel::pages_to_bytes(max, page);
        }
    }
    if let Ok(mm) = kernel::task_mm(task)
        && mm != 0
        && let Ok(score) = kernel::task_score(task, mm)
    {
        event.rss_anon = score.rss_anon;
        event.rss_file = score.rss_file;
        event.rss_shmem = score.rss_shmem;
        event.oom_score_adj = score.oom_score_adj;
    }
    kernel::emit(&event).inspect_err(|_| {
        warn!(
            ctx,
            "ring buffer full: kernel OOM victim record (pid {}) dropped", event.pid
        );
    })
}
