//! Discovery misses no cgroup (issue 14, "no missed crossing"): a cgroup made while a
//! directory is between its listing and its inotify watch is armed at once, not at the
//! rescan; running out of inotify watches is said once, with the count.
//!
//! The window between listing and watching is microseconds wide; the agent's
//! `OOMGUARD_TEST_LIST_PAUSE_MS` holds it open so each test makes its cgroup inside it
//! every time. The inotify limit is lowered in a user namespace of the agent's own
//! (`user.max_inotify_watches` is per user namespace and charged up the chain), so nothing
//! outside the test sees a lower limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use oomguard::cgroup::MemCgroup;
use oomguard_dev::fixture::*;

const PAUSE_MS: u64 = 1500;

/// An agent whose discovery holds each list/watch window open for [`PAUSE_MS`], with the
/// rescan an hour away: only the order of listing and watching can find a cgroup made in
/// the window.
fn paused_agent(root: &MemCgroup) -> Agent {
    let mut l = launch(&root.path).args(&["--policy", "noop", "--walk-interval", "3600"]);
    let mut cmd = l.command();
    cmd.env(oomguard::discovery::LIST_PAUSE_ENV, PAUSE_MS.to_string());
    Agent::spawn(cmd, None).expect("start the agent")
}

fn pause_of<'a>(
    what: &'a str,
    dir: &'a std::path::Path,
) -> impl Fn(&serde_json::Value) -> bool + 'a {
    let dir = dir.display().to_string();
    move |v| v["message"] == "test pause" && v["what"] == what && v["cgroup"] == dir.as_str()
}

#[test]
fn a_cgroup_made_after_the_walk_listed_its_parent_is_armed_without_the_rescan() {
    let Some(sb) = setup(kernel_ready, "disc-walk", 256 * M) else {
        return;
    };
    let agent = paused_agent(&sb.cg);
    // The first walk has listed the sandbox and not yet watched it.
    agent
        .wait_for(
            Duration::from_secs(10),
            pause_of("listed, not yet watched", &sb.cg.path),
        )
        .unwrap_or_else(|| panic!("no pause after the walk: {:#?}", agent.records()));
    let child = sb.child("made-in-the-window").unwrap();
    child.set_limit(64 * M).unwrap();
    // Unlisted and unwatched when made: only listing the sandbox again once it is watched
    // finds it (a pause of its own follows, then the arming).
    let armed = agent.wait_armed(&child.path, Duration::from_millis(3 * PAUSE_MS + 5000));
    assert!(
        armed.is_some(),
        "not armed (the rescan is an hour away); log: {:#?}",
        agent.records()
    );
    let path = child.path.display().to_string();
    let via: Vec<_> = agent
        .records()
        .into_iter()
        .filter(|r| r["message"] == "cgroup created" && r["cgroup"] == path.as_str())
        .map(|r| r["via"].clone())
        .collect();
    assert_eq!(via, ["rescan"], "found by the walk's second listing");
}

#[test]
fn a_cgroup_made_inside_a_new_directory_before_it_was_listed_is_armed() {
    let Some(sb) = setup(kernel_ready, "disc-created", 256 * M) else {
        return;
    };
    let agent = paused_agent(&sb.cg);
    agent
        .wait_for(Duration::from_secs(15), message("first walk done"))
        .unwrap_or_else(|| panic!("no first walk: {:#?}", agent.records()));
    // inotify reports the new directory; discovery watches it, then lists it.
    let pod = sb.child("pod").unwrap();
    agent
        .wait_for(
            Duration::from_secs(5),
            pause_of("watched, not yet listed", &pod.path),
        )
        .unwrap_or_else(|| panic!("no pause for the new directory: {:#?}", agent.records()));
    let inner = MemCgroup::new(pod.path.join("container"));
    std::fs::create_dir(&inner.path).unwrap();
    inner.set_limit(64 * M).unwrap();
    let armed = agent.wait_armed(&inner.path, Duration::from_millis(2 * PAUSE_MS + 5000));
    assert!(
        armed.is_some(),
        "a cgroup made between the watch and the listing of its parent was missed; log: {:#?}",
        agent.records()
    );
}

/// `unshare` runs the agent in a new user namespace (root mapped to root) whose
/// `user.max_inotify_watches` is `watches`.
fn agent_with_watches(root: &MemCgroup, watches: u32, args: &[&str]) -> Agent {
    let mut l = launch(&root.path).args(args);
    let inner = l.command();
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--", "sh", "-c"])
        .arg(format!(
            "echo {watches} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""
        ))
        .arg(inner.get_program())
        .args(inner.get_args());
    Agent::spawn(cmd, None).expect("start the agent in a user namespace")
}

/// Why the ENOSPC test cannot run here, if it cannot.
fn user_namespaces() -> Option<String> {
    match Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--",
            "sh",
            "-c",
            "echo 1 > /proc/sys/user/max_inotify_watches",
        ])
        .status()
    {
        Ok(st) if st.success() => None,
        Ok(st) => Some(format!(
            "cannot lower user.max_inotify_watches in a new user namespace: unshare {st}"
        )),
        Err(e) => Some(format!("unshare (util-linux) cannot run: {e}")),
    }
}

#[test]
fn running_out_of_inotify_watches_is_said_once_with_the_count() {
    let Some(sb) = setup(kernel_ready, "disc-enospc", 256 * M) else {
        return;
    };
    if !require(user_namespaces()) {
        return;
    }
    let children: Vec<MemCgroup> = (0..6)
        .map(|i| {
            let c = sb.child(&format!("c{i}")).unwrap();
            c.set_limit(64 * M).unwrap();
            c
        })
        .collect();
    // Seven directories, three watches: four stay unwatched, on every rescan.
    let agent = agent_with_watches(&sb.cg, 3, &["--policy", "noop", "--walk-interval", "1"]);
    agent
        .wait_for(Duration::from_secs(15), message("first walk done"))
        .unwrap_or_else(|| panic!("no first walk: {:#?}", agent.records()));
    // Three rescans more.
    std::thread::sleep(Duration::from_millis(3500));
    let said: Vec<_> = agent
        .records()
        .into_iter()
        .filter(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("inotify is out of watches"))
        })
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:#?}");
    assert_eq!(said[0]["unwatched"], 4, "{said:#?}");
    assert_eq!(
        said[0]["max_user_watches"], "3",
        "the limit of the agent's own user namespace: {said:#?}"
    );
    assert_eq!(
        agent.count(message(
            "cannot watch with inotify; the periodic rescan covers it"
        )),
        0,
        "no line per directory"
    );
    for c in &children {
        let path = c.path.display().to_string();
        assert!(
            agent.count(|r| r["message"] == "armed" && r["cgroup"] == path.as_str()) >= 1,
            "{} guarded all the same",
            c.path.display()
        );
    }
}
