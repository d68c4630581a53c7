//! Cgroup paths (`runtime::parse_cgroup`): the fuzzer's text as a path, and paths rendered the
//! way kubelet's cgroupfs and systemd drivers name pods and containers, which must parse back
//! to the pod and container they were made for.
#![no_main]

use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use oomguard::runtime::{CgroupRole, Qos, RuntimeHint, layout::is_container_id, parse_cgroup};

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    match parse_cgroup(&path) {
        CgroupRole::Pod { uid, .. } => assert!(is_uid(&uid), "{uid:?}"),
        CgroupRole::Container { pod_uid, id, .. } => {
            assert!(is_uid(&pod_uid), "{pod_uid:?}");
            assert!(is_container_id(&id), "{id:?}");
            assert!(path.contains(id.as_str()));
        }
        CgroupRole::Other => {}
    }
    let _ = round_trip(&mut Unstructured::new(data));
});

fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn from(u: &mut Unstructured, alphabet: &[u8], len: usize) -> Result<String> {
    (0..len).map(|_| Ok(*u.choose(alphabet)? as char)).collect()
}

fn round_trip(u: &mut Unstructured) -> Result<()> {
    // Where the hierarchy (or the test's own cgroup) puts kubepods: any components but the
    // two that anchor the parse.
    let mut prefix = String::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let len = u.int_in_range(1..=12)?;
        let part = from(u, b"abcdefghijklmnopqrstuvwxyz0123456789._-", len)?;
        if part != "kubepods" && part != "kubepods.slice" && part != "." && part != ".." {
            prefix.push('/');
            prefix.push_str(&part);
        }
    }
    let uid_len = u.int_in_range(1..=64)?;
    let uid = from(u, b"0123456789abcdefABCDEF-", uid_len)?;
    let id = from(u, b"0123456789abcdef", 64)?;
    let qos = *u.choose(&[Qos::Guaranteed, Qos::Burstable, Qos::BestEffort])?;
    let container = u.arbitrary::<bool>()?;
    let systemd = u.arbitrary::<bool>()?;
    let docker = u.arbitrary::<bool>()?;
    let trailing_slash = if u.arbitrary::<bool>()? { "/" } else { "" };

    let (path, hint) = if systemd {
        let (slice, pod) = match qos {
            Qos::Guaranteed => (
                String::new(),
                format!("kubepods-pod{}", uid.replace('-', "_")),
            ),
            Qos::Burstable => (
                "/kubepods-burstable.slice".to_string(),
                format!("kubepods-burstable-pod{}", uid.replace('-', "_")),
            ),
            Qos::BestEffort => (
                "/kubepods-besteffort.slice".to_string(),
                format!("kubepods-besteffort-pod{}", uid.replace('-', "_")),
            ),
        };
        let (scope, hint) = if docker {
            (format!("/docker-{id}.scope"), RuntimeHint::Docker)
        } else {
            (
                format!("/cri-containerd-{id}.scope"),
                RuntimeHint::Containerd,
            )
        };
        let scope = if container { scope } else { String::new() };
        (
            format!("{prefix}/kubepods.slice{slice}/{pod}.slice{scope}"),
            hint,
        )
    } else {
        let level = match qos {
            Qos::Guaranteed => "",
            Qos::Burstable => "/burstable",
            Qos::BestEffort => "/besteffort",
        };
        let child = if container {
            format!("/{id}")
        } else {
            String::new()
        };
        (
            format!("{prefix}/kubepods{level}/pod{uid}{child}"),
            RuntimeHint::Unknown,
        )
    };
    let path = format!("{path}{trailing_slash}");
    let want = if container {
        CgroupRole::Container {
            pod_uid: uid,
            id,
            hint,
        }
    } else {
        CgroupRole::Pod { uid, qos }
    };
    assert_eq!(parse_cgroup(&path), want, "{path}");
    Ok(())
}
