//! Background `memory.force_empty` (cgroup v2: `memory.reclaim`, kernel 5.19+), bounded in
//! time, never on the kill path.
//!
//! The kernel runs both synchronously in the writer and loops until the cgroup is
//! empty or reclaim stops making progress; a pending signal makes it return `EINTR`. So the
//! worker thread writes, and a watchdog interrupts it with `SIGUSR1` (a no-op handler
//! installed without `SA_RESTART`) once the time bound has passed.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup::MemCgroup;

/// Result of one force_empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReclaimResult {
    /// Returned by itself.
    Done { freed: u64, took: Duration },
    /// Interrupted at the time bound (an `EINTR` before it is retried, then `Failed`).
    TimedOut { freed: u64, took: Duration },
    /// The kernel refused (EBUSY on kernels before 3.16 while tasks remain, ENOENT...).
    Failed { errno: i32, took: Duration },
    /// A cgroup v2 kernel without `memory.reclaim` (before 5.19): no reclaim step (said
    /// once by the worker, not reported per cgroup).
    Unsupported,
}

/// One reclaim request and where its result goes.
pub struct Request {
    pub cgroup: MemCgroup,
    pub done: Box<dyn FnOnce(ReclaimResult) + Send>,
}

/// Handle to the reclaim worker.
#[derive(Clone)]
pub struct Reclaimer {
    tx: SyncSender<Request>,
}

impl Reclaimer {
    /// Queues a request; returns false (and drops it) when the worker is busy with a full
    /// queue. Never blocks.
    pub fn request(&self, req: Request) -> bool {
        match self.tx.try_send(req) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

fn install_interrupt_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and no SA_RESTART; the handler does
    // nothing, so it is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Default)]
struct Watch {
    /// The worker's pthread and the deadline of the write in progress.
    busy: Option<(libc::pthread_t, Instant)>,
    stop: bool,
}

/// Starts the worker and its watchdog. Requests beyond `queue` waiting ones are refused.
pub fn spawn(timeout: Duration, queue: usize) -> std::io::Result<Reclaimer> {
    install_interrupt_handler()?;
    let (tx, rx) = sync_channel::<Request>(queue);
    let watch = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
    let w2 = watch.clone();
    std::thread::Builder::new()
        .name("oomguard-reclaim".into())
        .spawn(move || worker(rx, timeout, w2))?;
    let w3 = watch;
    std::thread::Builder::new()
        .name("oomguard-reclaim-watchdog".into())
        .spawn(move || watchdog(w3))?;
    Ok(Reclaimer { tx })
}

fn worker(rx: Receiver<Request>, timeout: Duration, watch: Arc<(Mutex<Watch>, Condvar)>) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let mut said_unsupported = false;
    for req in rx {
        if req.cgroup.is_v2() && !req.cgroup.file("memory.reclaim").exists() {
            if !said_unsupported && req.cgroup.exists() {
                said_unsupported = true;
                tracing::warn!(
                    kernel = %crate::cgroup::layout::kernel_release(),
                    "cgroup v2 without memory.reclaim (kernel before 5.19): no reclaim step before the kill threshold"
                );
            }
            (req.done)(ReclaimResult::Unsupported);
            continue;
        }
        let before = req.cgroup.usage().unwrap_or(0);
        let start = Instant::now();
        {
            let (m, cv) = &*watch;
            if let Ok(mut w) = m.lock() {
                w.busy = Some((me, start + timeout));
            }
            cv.notify_all();
        }
        let deadline = start + timeout;
        let mut res = force_empty_once(&req.cgroup);
        // The watchdog signals only at the deadline: an EINTR before it came from another
        // signal. force_empty can simply run again, a few times at most.
        for _ in 0..EARLY_EINTR_RETRIES {
            match &res {
                Err(e) if is_eintr(e) && Instant::now() < deadline => {
                    res = force_empty_once(&req.cgroup);
                }
                _ => break,
            }
        }
        {
            let (m, _) = &*watch;
            if let Ok(mut w) = m.lock() {
                w.busy = None;
            }
        }
        let took = start.elapsed();
        let freed = before.saturating_sub(req.cgroup.usage().unwrap_or(before));
        let result = match res {
            Ok(()) => ReclaimResult::Done { freed, took },
            Err(e) if is_eintr(&e) && Instant::now() >= deadline => {
                ReclaimResult::TimedOut { freed, took }
            }
            Err(e) => ReclaimResult::Failed {
                errno: e.raw_os_error().unwrap_or(0),
                took,
            },
        };
        (req.done)(result);
    }
    let (m, cv) = &*watch;
    if let Ok(mut w) = m.lock() {
        w.stop = true;
    }
    cv.notify_all();
}

/// How often a force_empty interrupted before its deadline (not by the watchdog) is
/// written again before it is reported as failed with EINTR.
const EARLY_EINTR_RETRIES: usize = 3;

fn is_eintr(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINTR)
}

/// One `write(2)`: `write_all` would retry on EINTR and defeat the time bound. v1 writes
/// `memory.force_empty`; v2 asks `memory.reclaim` for the whole usage, and its `EAGAIN`
/// ("could not reclaim all of it") is a finished run, like force_empty stopping when
/// reclaim makes no more progress.
fn force_empty_once(cg: &MemCgroup) -> std::io::Result<()> {
    let (file, value) = if cg.is_v2() {
        (
            "memory.reclaim",
            cg.usage().unwrap_or(0).max(4096).to_string(),
        )
    } else {
        ("memory.force_empty", "0".to_string())
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.file(file))?;
    match f.write(value.as_bytes()) {
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
        r => r.map(|_| ()),
    }
}

fn watchdog(watch: Arc<(Mutex<Watch>, Condvar)>) {
    let (m, cv) = &*watch;
    let Ok(mut w) = m.lock() else { return };
    loop {
        if w.stop {
            return;
        }
        let wait = match w.busy {
            None => Duration::from_secs(3600),
            Some((thread, deadline)) => {
                let now = Instant::now();
                if now >= deadline {
                    // SAFETY: the worker thread is alive while `busy` is set (it clears the
                    // field under this lock before it can exit). Re-sent every 20 ms in case
                    // the signal landed before the write began.
                    unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
                    Duration::from_millis(20)
                } else {
                    deadline - now
                }
            }
        };
        w = match cv.wait_timeout(w, wait) {
            Ok((g, _)) => g,
            Err(_) => return,
        };
    }
}
