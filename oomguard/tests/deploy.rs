//! The manifests in deploy/ parse into Kubernetes API types and say what the spec says:
//! names, namespace, RBAC (exactly the verbs the events code uses, as recorded by the API
//! stand-in, within create/patch/update), resources, host mounts, env, args (parsed by the
//! agent's own command line), tolerations, priority, the exact capabilities, a read-only
//! root with every written directory on a volume, the metrics port with its probes and
//! Prometheus annotations. The kustomize base (`kubectl kustomize deploy/`) renders exactly
//! the plain manifests; overlays built on it with the `with-servicemonitor` and
//! `cgroup-v1-only` components, a namespace and an image, rendered by the real `kubectl
//! kustomize`, pass the same checks plus their own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use oomguard::cli::args::{Cli, Command};
use oomguard::config::Policy;
use oomguard::events::{EventRequest, Reason};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .canonicalize()
        .unwrap()
}

/// The documents of a multi-document YAML text.
fn parse(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            serde_yaml::from_value::<Value>(serde::Deserialize::deserialize(d).unwrap()).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn docs(file: &str) -> Vec<Value> {
    parse(&std::fs::read_to_string(deploy_dir().join(file)).unwrap())
}

/// `kubectl kustomize DIR` (kustomize is built into kubectl).
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed for the kustomize tests: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8(out.stdout).unwrap())
}

/// An operator's own overlay, in a directory of its own: `body` is its kustomization.yaml
/// with `DEPLOY` standing for the path of deploy/ (kustomize takes only relative paths).
fn overlay(body: &str) -> Vec<Value> {
    let dir = fixture::TempDir::new("kustomize");
    let up = dir.path().canonicalize().unwrap().components().count() - 1;
    let rel = Path::new(&"../".repeat(up)).join(deploy_dir().strip_prefix("/").unwrap());
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        body.replace("DEPLOY", rel.to_str().unwrap()),
    )
    .unwrap();
    kustomize(dir.path())
}

/// Documents in a stable order, for comparing renderings.
fn sorted(mut docs: Vec<Value>) -> Vec<Value> {
    docs.sort_by_key(|d| {
        format!(
            "{}/{}/{}",
            d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]
        )
    });
    docs
}

/// The base's manifests, as the plain files hold them.
fn plain() -> Vec<Value> {
    [docs("rbac.yaml"), docs("daemonset.yaml")].concat()
}

fn one_value(docs: &[Value], kind: &str) -> Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0].clone()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    serde_json::from_value(one_value(docs, kind)).unwrap()
}

/// The verbs the events code needs, from the requests it made to the API stand-in.
fn verbs_used_by_the_events_code() -> BTreeSet<String> {
    let rig = fixture::sink_rig("deploy", |_| {});
    let ev = EventRequest::from_decision(
        &fixture::decision("/x"),
        Reason::KillProcess,
        None,
        "node-1",
    );
    rig.sink.submit(ev.clone());
    rig.sink.submit(ev);
    let done = fixture::wait_for(Duration::from_secs(10), || {
        (rig.server.events().first().is_some_and(|e| e["count"] == 2)).then_some(())
    });
    assert!(done.is_some(), "{:#?}", rig.server.requests());
    rig.server
        .requests()
        .iter()
        .map(|r| {
            match r.method.as_str() {
                "POST" => "create",
                "PATCH" => "patch",
                "PUT" => "update",
                "GET" => "get",
                "DELETE" => "delete",
                m => panic!("unexpected method {m}"),
            }
            .to_string()
        })
        .collect()
}

#[test]
fn rbac_grants_exactly_core_events_create_patch_update() {
    let d = docs("rbac.yaml");
    let granted = check_rbac(&d, "kube-system");
    let used = verbs_used_by_the_events_code();
    assert!(
        used.is_subset(&granted),
        "the events code uses {used:?}, the role grants {granted:?}"
    );
    assert!(
        used.contains("create") && used.contains("patch"),
        "{used:?}"
    );
}

/// The ServiceAccount in `ns`, the ClusterRole (core events: create, patch, update, nothing
/// else) and its binding to that account; returns the verbs granted.
fn check_rbac(d: &[Value], ns: &str) -> BTreeSet<String> {
    let sa: ServiceAccount = one(d, "ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some("oomguard"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(ns));

    let role: ClusterRole = one(d, "ClusterRole");
    assert_eq!(role.metadata.name.as_deref(), Some("system:oomguard"));
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(r.api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(r.resources.as_deref(), Some(&["events".to_string()][..]));
    assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
    let granted: BTreeSet<String> = r.verbs.iter().cloned().collect();
    assert_eq!(
        granted,
        ["create", "patch", "update"].map(String::from).into()
    );

    let binding: ClusterRoleBinding = one(d, "ClusterRoleBinding");
    assert_eq!(binding.metadata.name.as_deref(), Some("system:oomguard"));
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "system:oomguard");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "oomguard");
    assert_eq!(subjects[0].namespace.as_deref(), Some(ns));
    granted
}

#[test]
fn the_daemonset_runs_the_agent_as_the_spec_says() {
    check_daemonset(&docs("daemonset.yaml"), "kube-system");
}

/// The DaemonSet in `ns` runs the agent as the spec says.
fn check_daemonset(d: &[Value], ns: &str) {
    let ds: DaemonSet = one(d, "DaemonSet");
    assert_eq!(ds.metadata.name.as_deref(), Some("oom-guard"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(ns));
    let spec = ds.spec.unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in spec.selector.match_labels.clone().unwrap() {
        assert_eq!(
            labels.get(&k),
            Some(&v),
            "the selector matches the template"
        );
    }
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("oomguard"));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = pod.tolerations.unwrap();
    assert!(
        tol.iter().any(|t| t.operator.as_deref() == Some("Exists")
            && t.key.is_none()
            && t.effect.is_none()),
        "tolerates every taint"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];

    let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(req["cpu"].0, "20m");
    assert_eq!(req["memory"].0, "120Mi");

    let env = c.env.as_ref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );

    // The args are the agent's own command line.
    let args = c.args.clone().unwrap();
    let cli = Cli::try_parse_from(std::iter::once("oomguard".to_string()).chain(args)).unwrap();
    let Command::Run(run) = cli.command else {
        panic!("the DaemonSet must run `oomguard run`")
    };
    // No --root: the agent picks the memory hierarchy of the node's layout (v1 or v2).
    assert_eq!(run.root, None);
    assert_eq!(run.policy, Policy::Container);
    assert_eq!(run.margin_ratio, 0.02);
    assert_eq!(
        run.docker_containerd_sock,
        Path::new("/run/docker/containerd/docker-containerd.sock")
    );
    assert_eq!(
        run.containerd_sock,
        Path::new("/run/containerd/containerd.sock")
    );
    assert_eq!(run.metrics_addr.as_deref(), Some("0.0.0.0:9102"));

    // Every host path the agent needs, mounted where the flags expect it.
    let volumes = pod.volumes.unwrap();
    let mounts = c.volume_mounts.clone().unwrap();
    let host_of = |mount_path: &str| {
        let m = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("no mount at {mount_path}"));
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        let source = match (&v.host_path, &v.empty_dir) {
            (Some(h), None) => h.path.clone(),
            // The state volume is the pod's own.
            (None, Some(_)) => mount_path.to_string(),
            _ => panic!("volume {} is neither hostPath nor emptyDir", v.name),
        };
        (source, m.read_only.unwrap_or(false))
    };
    for (path, ro) in [
        ("/run/oomguard", false),
        ("/sys/fs/cgroup", false),
        ("/sys/fs/bpf", false),
        ("/sys/kernel/tracing", false),
        ("/run/containerd", false),
        ("/run/docker/containerd", false),
        ("/var/lib/docker/containers", true),
    ] {
        assert_eq!(host_of(path), (path.to_string(), ro), "{path}");
    }
    for sock in [&run.containerd_sock, &run.docker_containerd_sock] {
        assert!(
            mounts.iter().any(|m| sock.starts_with(&m.mount_path)),
            "{sock:?}"
        );
    }
    // The root filesystem is read-only: everything the agent writes is on a writable volume.
    // One DaemonSet for v1 and v2 nodes: a hostPath that must already exist is one every
    // layout has (a v1-only path like /sys/fs/cgroup/memory would keep the pod from
    // starting on v2 nodes).
    for v in &volumes {
        if let Some(h) = &v.host_path
            && h.type_.as_deref() == Some("Directory")
        {
            assert!(
                !Path::new(&h.path).starts_with("/sys/fs/cgroup") || h.path == "/sys/fs/cgroup",
                "volume {} ({}) exists on one cgroup layout only",
                v.name,
                h.path
            );
        }
    }
    // Both layouts' memory roots lie beneath the cgroup volume.
    let v1_root = PathBuf::from("/sys/fs/cgroup/memory");
    let v2_root = PathBuf::from("/sys/fs/cgroup");
    for dir in [&run.state_dir, &run.bpf_pin_dir, &v1_root, &v2_root] {
        assert!(
            mounts
                .iter()
                .any(|m| dir.starts_with(&m.mount_path) && m.read_only != Some(true)),
            "{} is not on a writable volume",
            dir.display()
        );
    }

    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false), "capabilities, not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_user, Some(0));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .as_ref()
        .unwrap()
        .iter()
        .map(String::as_str)
        .collect();
    // Exactly what tests/least_privilege.rs shows is needed (docs/security.md says why).
    assert_eq!(
        added,
        BTreeSet::from([
            "KILL",
            "BPF",
            "PERFMON",
            "SYS_RESOURCE",
            "SYS_NICE",
            "IPC_LOCK"
        ])
    );
}

#[test]
fn the_daemonset_serves_metrics_and_probes_on_the_metrics_port() {
    check_metrics(&docs("daemonset.yaml"));
}

/// `--metrics-addr` on the port named `metrics`, the probes on it, the scrape annotations.
fn check_metrics(d: &[Value]) {
    let ds: DaemonSet = one(d, "DaemonSet");
    let template = ds.spec.unwrap().template;
    let annotations = template.metadata.unwrap().annotations.unwrap();
    let pod = template.spec.unwrap();
    let c = &pod.containers[0];

    let args = c.args.clone().unwrap();
    let addr = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .expect("--metrics-addr in the args");
    let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(addr, format!("0.0.0.0:{port}"), "reachable by the scraper");
    assert_ne!(port, 0, "port 0 turns the endpoint off");

    let ports = c.ports.as_ref().unwrap();
    let metrics = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(metrics.container_port, i32::from(port));
    assert_eq!(metrics.protocol.as_deref(), Some("TCP"));
    assert!(metrics.host_port.is_none(), "not on the node's network");

    for (probe, path) in [
        (
            c.liveness_probe.as_ref().expect("a livenessProbe"),
            "/healthz",
        ),
        (
            c.readiness_probe.as_ref().expect("a readinessProbe"),
            "/readyz",
        ),
    ] {
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
        let period = probe.period_seconds.unwrap();
        let timeout = probe.timeout_seconds.unwrap();
        let failures = probe.failure_threshold.unwrap();
        assert!(
            timeout < period,
            "{path}: timeout {timeout} >= period {period}"
        );
        assert!(failures >= 3, "{path}: one slow answer must not count");
    }
    // A liveness restart costs guarding: only after a stall of 30 s or more.
    let live = c.liveness_probe.as_ref().unwrap();
    assert!(live.period_seconds.unwrap() * live.failure_threshold.unwrap() >= 30);

    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn kubectl_kustomize_renders_the_base_as_the_plain_manifests() {
    let rendered = kustomize(&deploy_dir());
    assert_eq!(sorted(rendered.clone()), sorted(plain()));
    check_rbac(&rendered, "kube-system");
    check_daemonset(&rendered, "kube-system");
    check_metrics(&rendered);
}

#[test]
fn the_servicemonitor_component_scrapes_every_agent_as_job_oomguard() {
    let d = overlay("resources: [DEPLOY]\ncomponents: [DEPLOY/components/with-servicemonitor]\n");
    check_rbac(&d, "kube-system");
    check_daemonset(&d, "kube-system");
    check_metrics(&d);
    check_monitoring(&d, "kube-system");
}

/// The Service selects the agent pods and targets their metrics port; the ServiceMonitor
/// selects the Service, scrapes `/metrics` on that port and labels each target with its
/// node; the scrape job (the Service's name) is the one the rules use; the PrometheusRule
/// holds exactly the groups of deploy/prometheus/rules.yaml.
fn check_monitoring(d: &[Value], ns: &str) {
    let ds: DaemonSet = one(d, "DaemonSet");
    let template = ds.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let container = &template.spec.unwrap().containers[0];
    let metrics_port = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap()
        .container_port;

    let svc: Service = one(d, "Service");
    assert_eq!(svc.metadata.namespace.as_deref(), Some(ns));
    let spec = svc.spec.unwrap();
    assert_eq!(
        spec.cluster_ip.as_deref(),
        Some("None"),
        "headless: one target per agent pod"
    );
    for (k, v) in spec.selector.unwrap() {
        assert_eq!(
            pod_labels.get(&k),
            Some(&v),
            "the Service selects the agent pods"
        );
    }
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].port, metrics_port);
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("metrics".into()))
    );

    let sm = one_value(d, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["namespace"], ns);
    let svc_labels = svc.metadata.labels.unwrap();
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            svc_labels.get(k).map(String::as_str),
            v.as_str(),
            "the ServiceMonitor selects the Service"
        );
    }
    assert!(
        sm["spec"]["namespaceSelector"].is_null(),
        "the Service is in the ServiceMonitor's own namespace"
    );
    let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let ep = &endpoints[0];
    assert_eq!(ep["port"], "metrics");
    assert_eq!(ep["path"], "/metrics");
    assert!(
        ep["relabelings"].as_array().unwrap().iter().any(|r| {
            r["sourceLabels"] == serde_json::json!(["__meta_kubernetes_pod_node_name"])
                && r["targetLabel"] == "node"
        }),
        "each target carries its node: {ep}"
    );
    // The Prometheus Operator names the job after the Service (no jobLabel set): the
    // rules and the dashboard select job="oomguard".
    assert!(sm["spec"]["jobLabel"].is_null());
    let job = svc.metadata.name.unwrap();
    assert_eq!(job, "oomguard");
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/rules.yaml")).unwrap();
    assert!(rules.contains(&format!("job=\"{job}\"")));

    let pr = one_value(d, "PrometheusRule");
    assert_eq!(pr["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pr["metadata"]["namespace"], ns);
    assert_eq!(
        pr["spec"]["groups"],
        docs("prometheus/rules.yaml")[0]["groups"],
        "components/with-servicemonitor/prometheusrule.yaml differs from prometheus/rules.yaml"
    );
}

#[test]
fn the_cgroup_v1_only_component_keeps_the_agent_to_labelled_nodes() {
    let d = overlay("resources: [DEPLOY]\ncomponents: [DEPLOY/components/cgroup-v1-only]\n");
    check_rbac(&d, "kube-system");
    check_daemonset(&d, "kube-system");
    check_metrics(&d);
    let ds = one_value(&d, "DaemonSet");
    let terms = &ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(
        terms,
        &serde_json::json!([{"matchExpressions": [
            {"key": "oomguard.io/memory-cgroup", "operator": "In", "values": ["v1"]}
        ]}])
    );
    // Nothing else changes.
    let mut without = d.clone();
    for doc in &mut without {
        if doc["kind"] == "DaemonSet" {
            doc["spec"]["template"]["spec"]
                .as_object_mut()
                .unwrap()
                .remove("affinity");
        }
    }
    assert_eq!(sorted(without), sorted(plain()));
}

#[test]
fn an_overlay_moves_everything_to_its_namespace_and_image() {
    let d = overlay(
        "resources: [DEPLOY]\n\
         components:\n  - DEPLOY/components/with-servicemonitor\n  - DEPLOY/components/cgroup-v1-only\n\
         namespace: oomguard-system\n\
         images:\n  - name: oomguard/oomguard\n    newName: registry.example/oomguard\n    newTag: \"1.2.3\"\n",
    );
    check_rbac(&d, "oomguard-system");
    check_daemonset(&d, "oomguard-system");
    check_metrics(&d);
    check_monitoring(&d, "oomguard-system");
    for doc in &d {
        if doc["kind"] != "ClusterRole" && doc["kind"] != "ClusterRoleBinding" {
            assert_eq!(doc["metadata"]["namespace"], "oomguard-system", "{doc}");
        }
    }
    let ds: DaemonSet = one(&d, "DaemonSet");
    let image = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("registry.example/oomguard:1.2.3"));
}

#[test]
fn the_dockerfile_is_multi_stage_and_ships_the_agent() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let text = std::fs::read_to_string(path).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(text.contains("COPY --from=build"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/oomguard\"]"));
    // The shipped binary is the LTO build, and the profile it names exists.
    assert!(text.contains("--profile dist"), "{text}");
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .unwrap();
    let dist = manifest
        .split("[profile.dist]")
        .nth(1)
        .expect("[profile.dist] in Cargo.toml");
    let dist = dist.split("\n[").next().unwrap_or(dist);
    assert!(dist.contains("inherits = \"release\""), "{dist}");
    assert!(dist.contains("lto = \"fat\""), "{dist}");
}
