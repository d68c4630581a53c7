//! Process-wide setup the way earlyoom and lmkd do it: the agent must not be the kernel's
//! victim (`oom_score_adj -1000`), must not page-fault on its kill path (`mlockall`), and
//! its guard thread must run even when every CPU is busy (`SCHED_FIFO`).

use std::io;

/// The whole text of a kernel file kept open, read afresh with one `pread` at offset 0
/// (cgroupfs and procfs regenerate it there) into `buf`. `Ok(None)`: it filled `buf` (may be
/// cut) or is not UTF-8.
pub fn pread_whole<'a>(file: &std::fs::File, buf: &'a mut [u8]) -> io::Result<Option<&'a str>> {
    use std::os::unix::fs::FileExt;
    let n = file.read_at(buf, 0)?;
    if n == buf.len() {
        return Ok(None);
    }
    Ok(std::str::from_utf8(&buf[..n]).ok())
}

/// Makes the kernel's OOM killer never choose this process.
pub fn protect_from_oom_killer() -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", "-1000")
}

/// Locks current and future pages in memory, as earlyoom does: with `MCL_ONFAULT` (4.4+)
/// a page is locked when first touched, so the kill path never waits on reclaim or swap-in
/// for anything it has run before, while untouched stack and heap reservations are not made
/// resident. Kernels without `MCL_ONFAULT` (EINVAL) get plain `MCL_CURRENT | MCL_FUTURE`.
pub fn lock_memory() -> io::Result<()> {
    let flags = libc::MCL_CURRENT | libc::MCL_FUTURE;
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(flags | libc::MCL_ONFAULT) } == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::mlockall(flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One malloc arena for the whole process instead of one per thread that allocates
/// (glibc's default is up to 8 per core): every arena keeps the pages it touched, and
/// `mlockall` keeps them resident. The guard thread allocates little and the other threads
/// are mostly idle, so they rarely wait on each other for the allocator. Call it before
/// any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes two integers and only changes the allocator's own parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Unlocks the calling thread's own stack, for a thread about to exit: glibc keeps the
/// stacks of exited threads for reuse and gives their pages back (`MADV_DONTNEED`) only
/// where they are not locked, so under `mlockall` every thread that ever ran (a walk's
/// arming workers, idle kill workers, tokio's blocking threads) would stay resident.
pub fn unlock_own_stack() {
    // SAFETY: pthread_getattr_np fills the attr we pass for the calling thread and we
    // destroy it after; munlock takes an address range and changes no memory.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        if libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0 && !addr.is_null() {
            libc::munlock(addr, size);
        }
        libc::pthread_attr_destroy(&mut attr);
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: each guarded cgroup holds three
/// eventfds, and container runtimes often start daemons with a soft limit of 1,024 and a
/// far higher hard one. Returns `(old, new)` when it raised it.
pub fn raise_fd_limit() -> io::Result<Option<(u64, u64)>> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(soft), hard) = (lim.current, lim.maximum) else {
        return Ok(None); // unlimited already
    };
    if hard.is_some_and(|h| h <= soft) {
        return Ok(None);
    }
    let raised = rustix::process::Rlimit {
        current: hard,
        maximum: hard,
    };
    setrlimit(Resource::Nofile, raised).map_err(io::Error::from)?;
    Ok(Some((soft, hard.unwrap_or(u64::MAX))))
}

/// Gives freed heap memory back to the kernel (glibc's `malloc_trim`). Loading eBPF parses
/// the kernel's BTF (megabytes) and frees it again; without a trim the heap keeps those
/// pages, and `mlockall` keeps them resident. Returns whether anything was released.
pub fn trim_heap() -> bool {
    // SAFETY: malloc_trim takes a plain size and only touches the allocator's own state.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Puts the calling thread in `SCHED_FIFO` at `priority` (1-99).
pub fn set_realtime(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Normal scheduling (`SCHED_OTHER`) for the calling thread: helpers made by the real-time
/// thread inherit its policy otherwise.
pub fn set_normal() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The scheduling policy of the calling thread (for tests and reports).
pub fn current_policy() -> i32 {
    // SAFETY: pid 0 is the calling thread.
    unsafe { libc::sched_getscheduler(0) }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
