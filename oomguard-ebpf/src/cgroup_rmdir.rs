//! `tracepoint/cgroup/cgroup_rmdir`: a cgroup left the memory hierarchy.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use oomguard_common::kind;

use crate::kernel::{self, Result};

#[tracepoint(category = "cgroup", name = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    let _: Result<()> = kernel::emit_cgroup_event(&ctx, kind::CGROUP_RMDIR);
    0
}
