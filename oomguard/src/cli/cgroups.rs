//! `oomguard cgroups [--json]`: every cgroup the running agent guards, from its control
//! socket. Where some cgroup is guarded on memsw (a v1 memsw limit binds), column `ON` names
//! each one's counter (`memory` or `memsw`): LIMIT, USAGE and the thresholds are that
//! counter's.

use std::process::ExitCode;

use super::args::CgroupsArgs;
use super::{Align, Paint, Table, bytes, or_dash, short_cgroup};
use crate::cgroup::Counter;
use crate::control::{CgroupView, Client};

pub fn main(args: CgroupsArgs) -> ExitCode {
    let cgroups = match Client::new(&args.state_dir).cgroups() {
        Ok(c) => c,
        Err(e) => return super::fail(&e, args.json),
    };
    if args.json {
        return super::print_json(&cgroups);
    }
    if cgroups.is_empty() {
        println!("the agent guards no cgroup");
        return ExitCode::SUCCESS;
    }
    table(&cgroups, super::memory_mount().as_deref()).print();
    ExitCode::SUCCESS
}

fn table(cgroups: &[CgroupView], mount: Option<&std::path::Path>) -> Table {
    // The counter column only where some cgroup is guarded on memsw: on most nodes every
    // cgroup is guarded on memory, and the column would take room from the paths.
    let memsw = cgroups.iter().any(|c| c.counter != Counter::Memory);
    let mut headers = vec![("CGROUP", Align::Left)];
    if memsw {
        headers.push(("ON", Align::Left));
    }
    headers.extend([
        ("LIMIT", Align::Right),
        ("USAGE", Align::Right),
        ("RECLAIM", Align::Right),
        ("KILL", Align::Right),
        ("CACHE", Align::Right),
        ("STATE", Align::Left),
        ("LAST ACTION", Align::Left),
    ]);
    let mut t = Table::new(&headers).paint(headers.len() - 2, |state| match state {
        "acting" => Some(Paint::Red),
        "reclaiming" | "cooling down" => Some(Paint::Yellow),
        _ => None,
    });
    for c in cgroups {
        let last = c.last_action.as_ref().map(|a| match (&a.comm, a.pid) {
            (Some(comm), Some(pid)) => format!("{} {pid} {comm}", a.action),
            _ => a.action.clone(),
        });
        let mut row = vec![short_cgroup(&c.path, mount)];
        if memsw {
            row.push(c.counter.as_str().to_string());
        }
        row.extend([
            bytes(c.limit),
            or_dash(c.usage.map(bytes)),
            bytes(c.reclaim_threshold),
            bytes(c.threshold),
            or_dash(c.cache.map(bytes)),
            c.state.as_str().to_string(),
            or_dash(last),
        ]);
        t.row(row);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{CgroupState, LastAction};

    #[test]
    fn renders_one_row_per_cgroup_cut_only_to_a_width() {
        let view = CgroupView {
            path: format!(
                "/sys/fs/cgroup/memory/kubepods/burstable/pod{}",
                "a".repeat(60)
            ),
            counter: Counter::Memory,
            limit: 1000 << 20,
            usage: Some(500 << 20),
            margin: 20 << 20,
            threshold: 980 << 20,
            reclaim_threshold: 960 << 20,
            cache: None,
            state: CgroupState::CoolingDown,
            since: "2025-01-01T00:00:00Z".into(),
            last_action: Some(LastAction {
                action: "kill".into(),
                timestamp: "2025-01-01T00:00:00Z".into(),
                pid: Some(4242),
                comm: Some("oomguard-memhog".into()),
            }),
        };
        let t = table(
            std::slice::from_ref(&view),
            Some(std::path::Path::new("/sys/fs/cgroup/memory")),
        );
        let lines = t.lines(Some(100));
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.chars().count() <= 100), "{lines:#?}");
        assert!(lines[1].starts_with("/kubepods/burstable/"), "{lines:#?}");
        assert!(lines[1].contains('…'), "cut at the end: {lines:#?}");
        let uncut = t.lines(None);
        assert!(uncut[1].starts_with(&format!("/kubepods/burstable/pod{}  ", "a".repeat(60))));
        assert!(lines[1].contains("980.0M") && lines[1].contains("cooling down"));
        assert!(!uncut[0].contains(" ON "), "no memsw, no counter column");

        let mut memsw = view.clone();
        memsw.path = "/sys/fs/cgroup/memory/docker/abc".into();
        memsw.counter = Counter::Memsw;
        let t = table(
            &[view, memsw],
            Some(std::path::Path::new("/sys/fs/cgroup/memory")),
        );
        let uncut = t.lines(None);
        assert!(
            uncut[0].starts_with("CGROUP") && uncut[0].contains("  ON "),
            "{uncut:#?}"
        );
        assert!(uncut[1].contains("  memory  "), "{uncut:#?}");
        assert!(
            uncut[2].starts_with("/docker/abc") && uncut[2].contains("  memsw "),
            "{uncut:#?}"
        );
        assert!(uncut[1].ends_with("kill 4242 oomguard-memhog"));
    }
}
