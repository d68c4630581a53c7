//! `tracepoint/cgroup/cgroup_mkdir`: a cgroup appeared in the memory hierarchy.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use oomguard_common::kind;

use crate::kernel::{self, Result};

#[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    let _: Result<()> = kernel::emit_cgroup_event(&ctx, kind::CGROUP_MKDIR);
    0
}
