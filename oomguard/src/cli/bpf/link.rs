//! Attach points of the agent's programs, from the kernel's links (`BPF_LINK_GET_NEXT_ID`,
//! `BPF_OBJ_GET_INFO_BY_FD`): aya's `LinkInfo` does not expose the tracepoint names.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_TYPE_RAW_TRACEPOINT: u32 = 1;
const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;
const BPF_PERF_EVENT_TRACEPOINT: u32 = 5;

/// `union bpf_attr` for the `*_GET_NEXT_ID`/`*_GET_FD_BY_ID` commands.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `struct bpf_link_info`, as 8-byte words (little endian): type and id at 0, prog_id at 8,
/// the per-type union from byte 16.
fn link_info(fd: &OwnedFd, words: &mut [u64; 16]) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<[u64; 16]>() as u32,
        info: words.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The tracepoint of one link, when it is a raw tracepoint or a tracepoint perf link.
fn attach_point(fd: &OwnedFd) -> io::Result<Option<(u32, String)>> {
    let mut words = [0u64; 16];
    link_info(fd, &mut words)?;
    let kind = words[0] as u32;
    let prog_id = words[1] as u32;
    let mut name = [0u8; 256];
    let (prefix, name_ptr, len_word) = match kind {
        BPF_LINK_TYPE_RAW_TRACEPOINT => ("raw_tp", 2, 3),
        BPF_LINK_TYPE_PERF_EVENT if words[2] as u32 == BPF_PERF_EVENT_TRACEPOINT => {
            ("tracepoint", 3, 4)
        }
        _ => return Ok(None),
    };
    let mut words = [0u64; 16];
    words[name_ptr] = name.as_mut_ptr() as u64;
    words[len_word] = name.len() as u64;
    link_info(fd, &mut words)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let text = String::from_utf8_lossy(&name[..end]).into_owned();
    Ok(Some((prog_id, format!("{prefix}:{text}"))))
}

/// Program id → attach point (`raw_tp:rss_stat`, `tracepoint:cgroup_mkdir`) for every link the
/// kernel has; links that vanish during the walk are skipped.
pub fn attach_points() -> HashMap<u32, String> {
    let mut points = HashMap::new();
    let mut attr = IdAttr::default();
    while bpf(BPF_LINK_GET_NEXT_ID, &mut attr).is_ok() {
        let id = attr.next_id;
        let mut get = IdAttr {
            id,
            ..IdAttr::default()
        };
        if let Ok(fd) = bpf(BPF_LINK_GET_FD_BY_ID, &mut get) {
            // SAFETY: BPF_LINK_GET_FD_BY_ID returned a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            if let Ok(Some((prog, point))) = attach_point(&fd) {
                points.insert(prog, point);
            }
        }
        attr = IdAttr {
            id,
            ..IdAttr::default()
        };
    }
    points
}
