//! CRI and docker container labels (`ContainerInfo::from_labels`), one `key=value` a line.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use oomguard::runtime::labels::{
    CONTAINER_NAME, CRI_KIND, ContainerInfo, ContainerKind, DOCKER_TYPE, POD_NAME, POD_NAMESPACE,
    POD_UID,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let labels: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let info = ContainerInfo::from_labels("id", "k8s.io", &labels);
    let get = |k: &str| labels.get(k).map(String::as_str);
    let sandbox = get(CRI_KIND) == Some("sandbox") || get(DOCKER_TYPE) == Some("podsandbox");
    assert_eq!(info.kind == ContainerKind::Sandbox, sandbox);
    let named = [POD_NAMESPACE, POD_NAME, POD_UID]
        .iter()
        .all(|k| labels.contains_key(*k));
    assert_eq!(info.pod.is_some(), named);
    if let Some(pod) = info.pod {
        assert_eq!(Some(pod.uid.as_str()), get(POD_UID));
        // A sandbox (the pause container) is not one of the pod's containers.
        let want = if sandbox { None } else { get(CONTAINER_NAME) };
        assert_eq!(pod.container.as_deref(), want);
    }
});
