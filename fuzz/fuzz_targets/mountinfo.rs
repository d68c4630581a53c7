//! `/proc/self/mountinfo`: the cgroup v1 memory mounts (`memory_mounts`) and the one holding a
//! directory (`memory_mount_for`).
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use oomguard::cgroup::{memory_mount_for, memory_mounts, unescape_mount_field};

/// How the kernel writes a path into mountinfo (space, tab, newline, backslash as `\ooo`).
fn escape(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::new();
    for &b in p.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => s.push_str(&format!("\\{b:03o}")),
            _ => s.push(char::from(b)),
        }
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mounts = memory_mounts(&text);
    for m in &mounts {
        // Without escapes in the input, a mount point is a piece of it as written.
        if !text.contains('\\') {
            assert!(
                text.contains(m.to_string_lossy().as_ref()),
                "{m:?} is not in the input"
            );
        }
        // Escaping as the kernel does and decoding gives the same path back (ASCII paths:
        // the escape above writes bytes as chars).
        if m.as_os_str().is_ascii() {
            assert_eq!(&unescape_mount_field(&escape(m)), m);
        }
    }
    let dirs = mounts.iter().take(8).map(|m| m.join("kubepods")).chain([
        PathBuf::from("/sys/fs/cgroup/memory/kubepods"),
        PathBuf::from("/"),
    ]);
    for dir in dirs {
        let holders: Vec<&Path> = mounts
            .iter()
            .filter(|m| dir.starts_with(m))
            .map(PathBuf::as_path)
            .collect();
        match memory_mount_for(&text, &dir) {
            Some(found) => {
                assert!(
                    holders.contains(&found.as_path()),
                    "{found:?} does not hold {dir:?}"
                );
                // The innermost: no other memory mount holding `dir` is longer.
                let longest = holders.iter().map(|h| h.as_os_str().len()).max();
                assert_eq!(longest, Some(found.as_os_str().len()));
            }
            None => assert!(holders.is_empty(), "{dir:?} is under {holders:?}"),
        }
    }
});
