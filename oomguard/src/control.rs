//! The agent's control socket, `<state-dir>/control.sock`: the server the agent runs and the
//! client the debug CLI uses.
//!
//! The socket is mode 0600 in a 0700 directory, and the server also refuses peers whose uid is
//! not its own (root in a DaemonSet). The protocol is JSON lines: the client sends one request
//! line, `{"request":"cgroups"}` or `{"request":"events","follow":true|false}`, and the server
//! answers with JSON lines until it closes the connection (`cgroups`: one `{"cgroups":[...]}`
//! line; `events`: one line per event as [`crate::state::Event::to_json`], and while following,
//! `{"kind":"lagged","missed":N}` when the follower fell behind the ring). A refused request
//! gets one `{"error":"..."}` line.
//!
//! The server runs on plain threads (one accepting, one per client, at most [`MAX_CLIENTS`]):
//! it never shares a thread with the guard or with the agent's tokio runtime.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use thiserror::Error;

use crate::cgroup::{Counter, MemCgroup};
use crate::state::{AgentState, CgroupState, LastAction};

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Clients served at once; more are refused with an error line.
pub const MAX_CLIENTS: usize = 16;

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const FOLLOW_WAIT: Duration = Duration::from_millis(500);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot make the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the control socket's thread")]
    Spawn(#[source] io::Error),
    #[error("no agent at {path} (is `oomguard run` running with this --state-dir?)")]
    NoAgent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent at {path} sent something unexpected: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("the agent refused the request: {0}")]
    Refused(String),
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum Request {
    Cgroups,
    Events {
        #[serde(default)]
        follow: bool,
    },
}

/// One guarded cgroup in `oomguard cgroups --json`: thresholds as armed, `usage` and `cache`
/// read from the cgroup when asked (`null` when it just vanished). Bytes throughout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupView {
    pub path: String,
    /// The counter the cgroup is guarded on: `memory`, or `memsw` (memory and swap, where a
    /// v1 memsw limit binds). Absent from older agents' answers: `memory`.
    #[serde(default)]
    pub counter: Counter,
    /// The limit the thresholds were computed from (`memory.limit_in_bytes`; v2 `memory.max`;
    /// `memory.memsw.limit_in_bytes` when guarded on memsw).
    pub limit: u64,
    /// The counter's usage: `memory.usage_in_bytes` (v2: `memory.current`;
    /// `memory.memsw.usage_in_bytes` when guarded on memsw).
    pub usage: Option<u64>,
    pub margin: u64,
    /// The kill threshold: `limit - margin`, whole pages.
    pub threshold: u64,
    /// Where background `memory.force_empty` (v2: `memory.reclaim`) starts:
    /// `limit - 2 * margin`, whole pages.
    pub reclaim_threshold: u64,
    /// Reclaimable page cache (`total_inactive_file + total_active_file`; v2
    /// `inactive_file + active_file`).
    pub cache: Option<u64>,
    pub state: CgroupState,
    /// When the cgroup entered `state` (RFC 3339).
    pub since: String,
    pub last_action: Option<LastAction>,
}

/// Answers `oomguard cgroups` and `oomguard events` from a running agent; removes the
/// socket when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Written on drop: wakes the accept loop, which otherwise sleeps until a client comes.
    wake: Arc<std::os::fd::OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Makes `state_dir` (0700) if missing, replaces a stale socket, binds
    /// `<state_dir>/control.sock` (0600) and starts serving `state`.
    pub fn start(state: Arc<AgentState>, state_dir: &Path) -> Result<ControlServer, ControlError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| ControlError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let path = state_dir.join(SOCKET_NAME);
        let bind_error = |source| ControlError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed a stale control socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
                .map_err(|e| ControlError::Spawn(e.into()))?,
        );
        let (stop2, wake2) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("oomguard-control".into())
            .spawn(move || accept_loop(&listener, &state, &stop2, &wake2))
            .map_err(ControlError::Spawn)?;
        tracing::info!(path = %path.display(), "control socket ready");
        Ok(ControlServer {
            path,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = rustix::io::write(self.wake.as_fd(), &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: &UnixListener,
    state: &Arc<AgentState>,
    stop: &Arc<AtomicBool>,
    wake: &std::os::fd::OwnedFd,
) {
    let clients = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        // No timeout: an idle agent does not wake up for nothing; `wake` ends the wait.
        let (l, w) = (listener.as_fd(), wake.as_fd());
        let mut fds = [
            PollFd::new(&l, PollFlags::IN),
            PollFd::new(&w, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) if fds[0].revents().contains(PollFlags::IN) => {}
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: poll failed");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            refuse(stream, "too many clients");
            continue;
        }
        let (state, stop, count) = (state.clone(), stop.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("oomguard-control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &state, &stop) {
                    tracing::debug!(error = %e, "control socket: client ended");
                }
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn refuse(mut stream: UnixStream, why: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = writeln!(stream, "{}", serde_json::json!({ "error": why }));
}

/// True when `fd` is readable (or hung up) within `timeout`.
fn readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = Timespec::try_from(timeout).ok();
    matches!(poll(&mut fds, timeout.as_ref()), Ok(n) if n > 0)
}

/// The uid of the process at the other end of `stream` (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and a ucred-sized buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn serve_client(stream: UnixStream, state: &AgentState, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let own = rustix::process::geteuid().as_raw();
    if peer_uid(&stream)? != own {
        refuse(
            stream,
            "permission denied: the control socket is for the agent's own user",
        );
        return Ok(());
    }
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let mut out = io::BufWriter::new(&stream);
    match serde_json::from_str::<Request>(&line) {
        Ok(Request::Cgroups) => {
            let cgroups: Vec<CgroupView> = state.cgroups().into_iter().map(view).collect();
            writeln!(out, "{}", serde_json::json!({ "cgroups": cgroups }))?;
            out.flush()
        }
        Ok(Request::Events { follow }) => {
            let (events, _) = state.events_after(0);
            let mut last = 0;
            for e in events {
                writeln!(out, "{}", e.to_json())?;
                last = e.seq;
            }
            out.flush()?;
            if !follow {
                return Ok(());
            }
            // Everything already sent is up to `last_seq` even when the ring was empty.
            last = last.max(state.last_seq());
            while !stop.load(Ordering::Relaxed) {
                let (events, missed) = state.wait_events_after(last, FOLLOW_WAIT);
                if events.is_empty() {
                    if client_gone(&stream) {
                        return Ok(());
                    }
                    continue;
                }
                if missed > 0 {
                    let lagged = serde_json::json!({ "kind": "lagged", "missed": missed });
                    writeln!(out, "{lagged}")?;
                }
                for e in events {
                    writeln!(out, "{}", e.to_json())?;
                    last = e.seq;
                }
                out.flush()?;
            }
            Ok(())
        }
        Err(e) => {
            drop(out);
            refuse(stream, &format!("bad request: {e}"));
            Ok(())
        }
    }
}

/// A follower that closed its end: the socket reads EOF (or fails).
fn client_gone(stream: &UnixStream) -> bool {
    if !readable(stream.as_fd(), Duration::ZERO) {
        return false;
    }
    let mut buf = [0u8; 64];
    !matches!((&*stream).read(&mut buf), Ok(n) if n > 0)
}

fn view(cg: crate::state::GuardedCgroup) -> CgroupView {
    let mem = MemCgroup::new(&cg.path);
    CgroupView {
        path: cg.path.display().to_string(),
        counter: cg.thresholds.counter,
        limit: cg.thresholds.limit,
        usage: mem.counter_usage(cg.thresholds.counter).ok(),
        margin: cg.thresholds.margin,
        threshold: cg.thresholds.kill,
        reclaim_threshold: cg.thresholds.reclaim,
        cache: mem.stat().ok().map(|s| s.reclaimable_cache()),
        state: cg.state,
        since: cg.since,
        last_action: cg.last_action,
    }
}

/// The client side: one connection per request.
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// The agent serving `<state_dir>/control.sock`.
    pub fn new(state_dir: &Path) -> Client {
        Client {
            path: state_dir.join(SOCKET_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, request: &Request, timeout: Option<Duration>) -> Result<Lines, ControlError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| ControlError::NoAgent {
            path: self.path.clone(),
            source,
        })?;
        let io_error = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        stream.set_read_timeout(timeout).map_err(io_error)?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(io_error)?;
        let line = serde_json::to_string(request).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        writeln!(&stream, "{line}").map_err(io_error)?;
        Ok(Lines {
            path: self.path.clone(),
            reader: BufReader::new(stream),
        })
    }

    /// Every guarded cgroup, by path.
    pub fn cgroups(&self) -> Result<Vec<CgroupView>, ControlError> {
        let mut lines = self.send(&Request::Cgroups, Some(IO_TIMEOUT))?;
        let Some(mut v) = lines.next_value()? else {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                detail: "no answer".into(),
            });
        };
        serde_json::from_value(v["cgroups"].take()).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// The recent events, oldest first; with `follow`, then every new one as it comes. Each
    /// JSON event goes to `f`, which returns false to stop.
    pub fn events(
        &self,
        follow: bool,
        mut f: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<(), ControlError> {
        let timeout = (!follow).then_some(IO_TIMEOUT);
        let mut lines = self.send(&Request::Events { follow }, timeout)?;
        while let Some(v) = lines.next_value()? {
            if !f(v) {
                break;
            }
        }
        Ok(())
    }
}

/// The answer's JSON lines.
struct Lines {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Lines {
    /// The next line, `None` at the end; an `{"error":...}` line is an error.
    fn next_value(&mut self) -> Result<Option<serde_json::Value>, ControlError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| ControlError::Protocol {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            return Err(ControlError::Refused(err.to_string()));
        }
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::report::{Action, Decision};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("oomguard-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn decision(cgroup: &str) -> Decision {
        let mut d = Decision::new("h", crate::config::Policy::Process, Action::Kill, cgroup);
        d.proccgroup = cgroup.into();
        d.wake_to_kill_us = Some(5);
        d
    }

    #[test]
    fn serves_cgroups_and_events_over_a_private_socket() {
        let dir = temp_dir("serve");
        let state = AgentState::new();
        let th = crate::threshold::Margins::default()
            .thresholds(100 << 20)
            .unwrap();
        state.cgroup_armed(Path::new("/nonexistent/cg"), th);
        let server = ControlServer::start(state.clone(), &dir).unwrap();
        let meta = std::fs::metadata(server.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);

        let client = Client::new(&dir);
        let cgroups = client.cgroups().unwrap();
        assert_eq!(cgroups.len(), 1);
        assert_eq!(cgroups[0].threshold, th.kill);
        assert_eq!(cgroups[0].reclaim_threshold, th.reclaim);
        assert_eq!(cgroups[0].usage, None, "the cgroup does not exist");
        assert_eq!(cgroups[0].counter, Counter::Memory);

        state.decision(&decision("/nonexistent/cg"));
        let mut seen = Vec::new();
        client
            .events(false, |v| {
                seen.push(v);
                true
            })
            .unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["decision"]["action"], "kill");

        // A follower gets the past, then what happens next.
        let dir2 = dir.clone();
        let follower = std::thread::spawn(move || {
            let mut got = Vec::new();
            Client::new(&dir2)
                .events(true, |v| {
                    got.push(v);
                    got.len() < 2
                })
                .unwrap();
            got
        });
        std::thread::sleep(Duration::from_millis(300));
        state.decision(&decision("/nonexistent/other"));
        let got = follower.join().unwrap();
        assert_eq!(got[1]["cgroup"], "/nonexistent/other");
        assert_eq!(got[1]["seq"], 2);

        drop(server);
        assert!(!dir.join(SOCKET_NAME).exists(), "the socket is removed");
        assert!(matches!(
            client.cgroups(),
            Err(ControlError::NoAgent { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_request_gets_an_error_line() {
        let dir = temp_dir("bad");
        let _server = ControlServer::start(AgentState::new(), &dir).unwrap();
        let stream = UnixStream::connect(dir.join(SOCKET_NAME)).unwrap();
        writeln!(&stream, "{{\"request\":\"reboot\"}}").unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v["error"].as_str().unwrap().contains("bad request"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
