//! Colour only on a terminal: the agent's text log and the CLI's tables carry ANSI escapes
//! on a pseudo-terminal and none in a pipe (a file, a container log, journald); JSON logs
//! carry none even on a terminal. The CLI's tables fit a terminal's width, cut at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oomguard_dev::fixture::*;

const ESC: char = '\x1b';

/// A pseudo-terminal: the child writes to the slave side, a thread collects the master
/// side until every slave is closed.
struct Pty {
    slave: Option<OwnedFd>,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    fn open() -> Pty {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two new descriptors, which we own from here on.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: just opened, owned by nobody else.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let output = Arc::new(Mutex::new(Vec::new()));
        let out = output.clone();
        let reader = std::thread::spawn(move || {
            let mut m = std::fs::File::from(master);
            let mut buf = [0u8; 4096];
            // EIO once the last slave descriptor is closed.
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            slave: Some(slave),
            output,
            reader: Some(reader),
        }
    }

    fn stdio(&self) -> Stdio {
        Stdio::from(self.slave.as_ref().unwrap().try_clone().unwrap())
    }

    /// Closes our slave side: the reader ends when the child's copies close too.
    fn close_slave(&mut self) {
        self.slave = None;
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).replace("\r\n", "\n")
    }

    /// Everything written, once the child is gone (bounded).
    fn finish(mut self) -> String {
        self.close_slave();
        let reader = self.reader.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(reader.is_finished(), "the pty stayed open");
        self.text()
    }
}

/// Stops the child (SIGTERM, then SIGKILL) even when the test fails.
struct Running(Child);

impl Running {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        wait_exit(&mut self.0, Duration::from_secs(10))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) && self.stop().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `oomguard run --log-format FORMAT` on a sandbox, its stderr on `stderr`; the environment
/// would allow colour on a terminal.
fn agent(sb: &oomguard_dev::sandbox::Sandbox, format: &str, stderr: Stdio) -> Running {
    let child = launch(&sb.cg.path)
        .pins("logs")
        .args(&["--mode", "eventfd", "--log-format", format])
        .command()
        .env("RUST_LOG", "info")
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Running(child)
}

/// Polls `text` until it contains `needle`, for up to 15 s.
fn wait_text(mut text: impl FnMut() -> String, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = text();
        if t.contains(needle) || Instant::now() >= deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in text.chars() {
        match (esc, c) {
            (false, ESC) => esc = true,
            (true, 'm') => esc = false,
            (false, c) => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn the_text_log_is_coloured_on_a_terminal_only() {
    let Some(sb) = setup(kernel_ready, "logs-tty", 64 * M) else {
        return;
    };

    let mut pty = Pty::open();
    let mut on_tty = agent(&sb, "text", pty.stdio());
    pty.close_slave();
    let seen = wait_text(|| pty.text(), "first walk done");
    assert!(seen.contains("first walk done"), "{seen:?}");
    assert_eq!(on_tty.stop().and_then(|s| s.code()), Some(0));
    let tty = pty.finish();
    assert!(tty.contains(ESC), "no colour on a terminal: {tty:?}");
    assert!(strip_ansi(&tty).contains(" INFO "), "{tty:?}");

    let mut piped = agent(&sb, "text", Stdio::piped());
    let mut err = piped.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Long enough to have logged the start, the walk and the first walk's end.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(piped.stop().and_then(|s| s.code()), Some(0));
    let log = reader.join().unwrap();
    assert!(log.contains("first walk done"), "{log:?}");
    assert!(log.contains(" INFO "), "{log:?}");
    assert!(!log.contains(ESC), "colour escapes in a pipe: {log:?}");
}

#[test]
fn the_json_log_has_no_colour_even_on_a_terminal() {
    let Some(sb) = setup(kernel_ready, "logs-json", 64 * M) else {
        return;
    };
    let mut pty = Pty::open();
    let mut on_tty = agent(&sb, "json", pty.stdio());
    pty.close_slave();
    let seen = wait_text(|| pty.text(), "first walk done");
    assert!(seen.contains("first walk done"), "{seen:?}");
    assert_eq!(on_tty.stop().and_then(|s| s.code()), Some(0));
    let log = pty.finish();
    assert!(!log.contains(ESC), "colour escapes in JSON: {log:?}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 3, "{log:?}");
    for l in lines {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
    }
}

#[test]
fn cli_tables_are_coloured_on_a_terminal_only() {
    if !kernel_ready() {
        return;
    }
    let doctor = |stdout: Stdio, no_color: Option<&str>| {
        let mut cmd = Command::new(agent_exe());
        cmd.arg("doctor")
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null());
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let mut doctor = Running(cmd.spawn().unwrap());
        let st = wait_exit(&mut doctor.0, Duration::from_secs(30));
        assert!(st.is_some(), "doctor did not finish within 30 s");
    };

    let pty = Pty::open();
    doctor(pty.stdio(), None);
    let tty = pty.finish();
    assert!(tty.contains("\x1b[1mGROUP\x1b[0m"), "bold header: {tty:?}");
    assert!(tty.contains("\x1b[32mok\x1b[0m"), "green ok: {tty:?}");

    let out = Command::new(agent_exe())
        .arg("doctor")
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let piped = String::from_utf8_lossy(&out.stdout);
    assert!(piped.contains("GROUP"), "{piped:?}");
    assert!(!piped.contains(ESC), "colour escapes in a pipe: {piped:?}");
    // The same table, only without the escapes.
    let header = |t: &str| {
        t.lines()
            .find(|l| l.contains("GROUP"))
            .map(str::to_string)
            .unwrap()
    };
    assert_eq!(strip_ansi(&header(&tty)), header(&piped));

    let pty = Pty::open();
    doctor(pty.stdio(), Some("1"));
    let tty = pty.finish();
    assert!(tty.contains("GROUP"), "{tty:?}");
    assert!(!tty.contains(ESC), "NO_COLOR is set: {tty:?}");
}

#[test]
fn cli_tables_fit_a_terminal_and_cut_at_the_end() {
    if !kernel_ready() {
        return;
    }
    let pty = Pty::open();
    let mut doctor = Running(
        Command::new(agent_exe())
            .arg("doctor")
            .env("COLUMNS", "72")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(pty.stdio())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let st = wait_exit(&mut doctor.0, Duration::from_secs(30));
    assert!(st.is_some(), "doctor did not finish within 30 s");
    let out = pty.finish();
    assert!(out.lines().all(|l| l.chars().count() <= 72), "{out}");
    // Some detail is longer than the columns left to it: its beginning stays, its end goes;
    // the check's name and status stay whole.
    let cut: Vec<&str> = out.lines().filter(|l| l.contains('…')).collect();
    assert!(!cut.is_empty(), "{out}");
    assert!(cut.iter().all(|l| l.ends_with('…')), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("cgroup ") && l.contains(" cgroup.event_control ")),
        "{out}"
    );
}
