//! docker's `config.v2.json` (`parse_docker_labels`) and what the labels say
//! (`ContainerInfo::from_labels`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::runtime::labels::{ContainerInfo, parse_docker_labels};

fuzz_target!(|data: &[u8]| {
    let Ok(labels) = parse_docker_labels(&String::from_utf8_lossy(data)) else {
        return;
    };
    let info = ContainerInfo::from_labels("id", "moby", &labels);
    assert_eq!(info.namespace, "moby");
    let rendered = serde_json::json!({ "Config": { "Labels": labels } }).to_string();
    assert_eq!(parse_docker_labels(&rendered).ok(), Some(labels));
});
