//! `oomguard events [--follow] [--json]`: the running agent's recent decisions (kills, skips,
//! reclaims, kernel OOMs) and pressure signals, from its control socket; `--follow` streams
//! new ones until interrupted.

use std::io::Write;
use std::process::ExitCode;

use super::args::EventsArgs;
use super::{Align, Paint, Table, bytes, short_cgroup};
use crate::control::Client;

const HEADERS: [(&str, Align); 7] = [
    ("TIME", Align::Left),
    ("EVENT", Align::Left),
    ("CGROUP", Align::Left),
    ("USAGE", Align::Right),
    ("THRESHOLD", Align::Right),
    ("VIA", Align::Left),
    ("VICTIM", Align::Left),
];

/// Followed (row-at-a-time) output: columns this wide, so that rows line up while their
/// cells fit.
const FOLLOW_WIDTHS: [usize; 7] = [8, 12, 30, 8, 9, 7, 0];

/// TIME and EVENT are what a reader scans: never cut.
fn template() -> Table {
    Table::new(&HEADERS).whole(0).whole(1).paint(1, event_paint)
}

pub fn main(args: EventsArgs) -> ExitCode {
    let mount = super::memory_mount();
    let client = Client::new(&args.state_dir);
    let mut table = template();
    let follow = template().min_widths(&FOLLOW_WIDTHS);
    let (width, colour) = (super::stdout_width(), super::colour_stdout());
    let mut stdout = std::io::stdout().lock();
    if args.follow && !args.json {
        for line in follow.render(width, colour) {
            let _ = writeln!(stdout, "{line}");
        }
    }
    let result = client.events(args.follow, |v| {
        let written = if args.json {
            writeln!(stdout, "{v}")
        } else if let Some(row) = row(&v, mount.as_deref()) {
            if args.follow {
                writeln!(stdout, "{}", follow_line(&follow, row, width, colour))
            } else {
                table.row(row.to_vec());
                Ok(())
            }
        } else {
            Ok(())
        };
        // A closed stdout (`| head`) ends the stream.
        written.and_then(|()| stdout.flush()).is_ok()
    });
    if let Err(e) = result {
        return super::fail(&e, args.json);
    }
    if !args.json && !args.follow {
        if table.is_empty() {
            let _ = writeln!(stdout, "no events yet");
        } else {
            for line in table.render(width, colour) {
                let _ = writeln!(stdout, "{line}");
            }
        }
    }
    ExitCode::SUCCESS
}

/// Kills stand out; kernel OOMs (the agent lost the race) and failures most.
fn event_paint(event: &str) -> Option<Paint> {
    match event {
        "kill" => Some(Paint::Bold),
        "kernel-oom" | "kill-failed" => Some(Paint::Red),
        "would-kill" | "no-candidate" | "lagged" => Some(Paint::Yellow),
        _ => None,
    }
}

/// One row streamed on its own, in the columns of `follow` (later rows are not known yet).
fn follow_line(follow: &Table, row: [String; 7], width: Option<usize>, colour: bool) -> String {
    let mut t = follow.clone();
    t.row(row.to_vec());
    t.render(width, colour).pop().unwrap_or_default()
}

/// The table cells of one JSON event; `None` for lines that are not events.
fn row(v: &serde_json::Value, mount: Option<&std::path::Path>) -> Option<[String; 7]> {
    let time = v["timestamp"]
        .as_str()
        .and_then(|t| t.get(11..19))
        .unwrap_or("-")
        .to_string();
    let cgroup = short_cgroup(v["cgroup"].as_str().unwrap_or("-"), mount);
    let num = |x: &serde_json::Value| x.as_u64().map_or_else(|| "-".into(), bytes);
    match v["kind"].as_str()? {
        "decision" => {
            let d = &v["decision"];
            let victim = d["killed"]
                .as_array()
                .and_then(|k| k.first())
                .map(|k| {
                    format!(
                        "{} {}",
                        k["pid"].as_i64().unwrap_or(0),
                        k["comm"].as_str().unwrap_or("?")
                    )
                })
                .or_else(|| {
                    d["detail"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "-".into());
            let victim = match (d["action"].as_str(), d["policy"].as_str()) {
                (Some("kill" | "would-kill" | "kill-failed"), Some(p)) => format!("{victim} ({p})"),
                _ => victim,
            };
            Some([
                time,
                d["action"].as_str().unwrap_or("?").to_string(),
                cgroup,
                num(&d["usage"]),
                num(&d["threshold"]),
                d["signal"].as_str().unwrap_or("-").to_string(),
                victim,
            ])
        }
        "signal" => {
            let s = &v["signal"];
            Some([
                time,
                s["what"].as_str().unwrap_or("signal").to_string(),
                cgroup,
                num(&s["usage"]),
                num(&s["threshold"]),
                s["source"].as_str().unwrap_or("-").to_string(),
                "-".into(),
            ])
        }
        "lagged" => Some([
            "-".into(),
            "lagged".into(),
            format!("{} event(s) missed", v["missed"]),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_reads_as_one_row() {
        let v = serde_json::json!({
            "seq": 3, "timestamp": "2025-06-01T12:34:56.789Z", "kind": "decision",
            "cgroup": "/sys/fs/cgroup/memory/a/b",
            "decision": {"action": "kill", "policy": "process", "usage": 1073741824u64,
                         "threshold": 1048576000u64, "signal": "ebpf",
                         "killed": [{"pid": 42, "comm": "memhog"}], "detail": ""}
        });
        let row = row(&v, Some(std::path::Path::new("/sys/fs/cgroup/memory"))).unwrap();
        assert_eq!(
            row,
            [
                "12:34:56",
                "kill",
                "/a/b",
                "1.0G",
                "1000.0M",
                "ebpf",
                "42 memhog (process)"
            ]
        );
        let follow = template().min_widths(&FOLLOW_WIDTHS);
        let line = follow_line(&follow, row.clone(), None, false);
        assert_eq!(
            line,
            "12:34:56  kill          /a/b                                1.0G    1000.0M  ebpf     42 memhog (process)"
        );
        // On a narrow terminal the time and the event stay whole; the victim is cut at its end.
        let line = follow_line(&follow, row, Some(90), false);
        assert!(line.starts_with("12:34:56  kill  "), "{line}");
        assert!(line.ends_with("  42 memhog (proce…"), "{line}");
        assert_eq!(line.chars().count(), 90, "{line}");
        assert!(super::row(&serde_json::json!({"end": true}), None).is_none());
    }
}
