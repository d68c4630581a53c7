//! Finding and making the pseudo-filesystem mounts the programs need (tracefs, bpffs).

use std::{
    ffi::{CStr, CString},
    fs, io,
    path::{Path, PathBuf},
};

use super::BpfError;

const MOUNTS_FILE: &str = "/proc/self/mounts";

/// Where bpffs is expected; mounted there when missing.
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn read_mounts() -> Result<String, BpfError> {
    fs::read_to_string(MOUNTS_FILE).map_err(|source| BpfError::Read {
        path: MOUNTS_FILE.into(),
        source,
    })
}

/// Mount points of filesystems of type `fstype` in `mounts` (`/proc/self/mounts` format).
pub fn targets_of<'a>(mounts: &'a str, fstype: &str) -> Vec<&'a str> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == fstype).then_some(target)
        })
        .collect()
}

/// Mounts bpffs at [`BPFFS`] unless it is mounted there; true when this call mounted it.
pub fn ensure_bpffs() -> Result<bool, BpfError> {
    if targets_of(&read_mounts()?, "bpf").contains(&BPFFS) {
        return Ok(false);
    }
    let path = PathBuf::from(BPFFS);
    mount(c"bpf", &path, c"bpf").map_err(|source| BpfError::Mount {
        path: path.clone(),
        fstype: "bpf",
        source,
    })?;
    tracing::info!(path = BPFFS, "mounted bpffs, which was not mounted");
    Ok(true)
}

/// `mount(source, target, fstype, 0, NULL)`.
pub fn mount(source: &CStr, target: &Path, fstype: &CStr) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; neither
    // filesystem takes mount data.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_mount_points_by_type() {
        let mounts = "\
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
nodev /sys/kernel/tracing tracefs rw,relatime 0 0
bpf /run/other bpf rw 0 0
";
        assert_eq!(targets_of(mounts, "bpf"), ["/sys/fs/bpf", "/run/other"]);
        assert_eq!(targets_of(mounts, "tracefs"), ["/sys/kernel/tracing"]);
        assert!(targets_of(mounts, "cgroup").is_empty());
    }
}
