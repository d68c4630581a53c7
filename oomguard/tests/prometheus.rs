//! The operator kit against the real Prometheus (Debian's, installed by `cargo xtask
//! setup`): `deploy/prometheus/rules.yaml` passes `promtool check rules` and its unit tests
//! (`rules.test.yaml`), where every alert both fires and stays silent; a real Prometheus on
//! loopback scrapes a running agent, sees the kill the test drives through its HTTP API,
//! evaluates every rule without error (and fires none), and answers every PromQL
//! expression of `deploy/grafana/oomguard.json` with series.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fixture::{
    M, TempDir, free_port, hog, kernel_ready, killed_by_sigkill, setup, wait_exit, wait_for,
};
use serde_json::Value;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// A tool from Debian's `prometheus` package; `cargo xtask setup` installs it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run `cargo xtask setup` (Debian package prometheus)")
        })
}

/// Runs promtool; its whole output on failure.
fn promtool(args: &[&str]) -> String {
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every alert name in rules.yaml.
fn alerts() -> BTreeSet<String> {
    yaml("prometheus/rules.yaml")["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let alerts = alerts();
    for needed in [
        "OomGuardDown",
        "OomGuardGuardLoopStalled",
        "OomGuardKernelOomKill",
        "OomGuardKillRateHigh",
        "OomGuardEventsFailing",
    ] {
        assert!(alerts.contains(needed), "no alert {needed}: {alerts:?}");
    }
    let checked = promtool(&["check", "rules", "rules.yaml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    let tested = promtool(&["test", "rules", "rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Each alert has a case where it fires and one where it stays silent.
    let tests = yaml("prometheus/rules.test.yaml");
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for alert in &alerts {
        let of_alert = || cases.iter().filter(|c| c["alertname"] == alert.as_str());
        let fires = of_alert().any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let silent = of_alert().any(|c| c["exp_alerts"].as_array().is_some_and(Vec::is_empty));
        assert!(fires, "rules.test.yaml never expects {alert} to fire");
        assert!(
            silent,
            "rules.test.yaml never expects {alert} to stay silent"
        );
    }
}

/// `text` percent-encoded for a URL query (everything but the unreserved characters).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.1: the status and the body (chunked transfer decoded).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status: {head:?}")))?;
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

/// A real Prometheus on a loopback port with a data directory of its own, scraping one
/// agent every second as job "oomguard" (target label node="test-node") and evaluating
/// rules.yaml every second. Stopped and removed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

const NODE: &str = "test-node";

impl Prometheus {
    fn start(agent: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        let rules = deploy("prometheus/rules.yaml").canonicalize().unwrap();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: oomguard\n    static_configs:\n      \
                 - targets: ['{agent}']\n        labels:\n          node: {NODE}\n",
                rules.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let addr = free_port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, addr, dir };
        let ready = wait_for(Duration::from_secs(60), || {
            matches!(http_get(addr, "/-/ready"), Ok((200, _))).then_some(())
        });
        assert!(
            ready.is_some(),
            "Prometheus not ready in 60 s:\n{}",
            p.log()
        );
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; its `data` (the call must succeed).
    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path).unwrap();
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {status} {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"].as_array().unwrap().clone()
    }

    /// The value of a query that returns one series.
    fn scalar(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every PromQL expression of the dashboard (panel targets, nested rows included).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        for p in v["panels"].as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(t["expr"].as_str().unwrap().to_string());
            }
            walk(p, out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// Grafana's variables as the test's Prometheus gives them: every node, a one-minute
/// window (the scrape interval is one second).
fn instantiate(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$node", ".*")
}

/// `oomguard_*` metric names used in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("oomguard_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn a_real_prometheus_scrapes_a_kill_evaluates_the_rules_and_answers_the_dashboard() {
    let Some(sb) = setup(kernel_ready, "prometheus", 128 * M) else {
        return;
    };
    let metrics = free_port();
    let a = metrics.to_string();
    let agent = fixture::launch(&sb.cg.path)
        .args(fixture::WINNABLE)
        .args(&["--metrics-addr", &a])
        .start();
    let prom = Prometheus::start(metrics);
    let up = wait_for(Duration::from_secs(30), || {
        (prom.scalar(r#"up{job="oomguard"}"#) == Some(1.0)).then_some(())
    });
    assert!(
        up.is_some(),
        "the agent is not up in Prometheus:\n{}",
        prom.log()
    );
    let kills = r#"oomguard_kills_total{job="oomguard",node="test-node",policy="process",outcome="killed"}"#;
    // Exported at 0 before the first kill, so increase() sees that kill.
    assert_eq!(prom.scalar(kills), Some(0.0), "no kill yet");

    let mut hog = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    fixture::expect_decision(&agent, "kill", Duration::from_secs(5));
    let counted = wait_for(Duration::from_secs(30), || {
        (prom.scalar(kills) == Some(1.0)).then_some(())
    });
    assert!(
        counted.is_some(),
        "Prometheus does not show the kill: {:?}",
        prom.query(r#"{__name__=~"oomguard_kills_total"}"#)
    );
    assert_eq!(
        prom.scalar(r#"oomguard_kernel_ooms_total{job="oomguard"}"#),
        Some(0.0)
    );
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    // The latency histogram holds the kill.
    assert_eq!(
        prom.scalar(r#"oomguard_signal_to_kill_seconds_count{job="oomguard"}"#),
        Some(1.0)
    );

    // Every rule is evaluated without error, and none fires for a healthy agent.
    let alerts = alerts();
    let evaluated = wait_for(Duration::from_secs(30), || {
        let groups = prom.api("/api/v1/rules")["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        rules
            .iter()
            .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
            .then_some(rules)
    })
    .unwrap_or_else(|| panic!("rules not all evaluated ok: {}", prom.api("/api/v1/rules")));
    let names: BTreeSet<String> = evaluated
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, alerts);
    // With a 1 s scrape, the first samples of the guard-loop counter (it turns every 2.5 s
    // when idle) can be equal, so OomGuardGuardLoopStalled may be pending for a moment;
    // for a healthy agent every alert is silent once the window holds a few turns.
    let mut last = Value::Null;
    let silent = wait_for(Duration::from_secs(30), || {
        last = prom.api("/api/v1/alerts")["alerts"].clone();
        assert!(
            last.as_array()
                .unwrap()
                .iter()
                .all(|a| a["state"] != "firing"),
            "an alert fires for a healthy agent: {last}"
        );
        (last == Value::Array(Vec::new())).then_some(())
    });
    assert!(
        silent.is_some(),
        "alerts pending for a healthy agent: {last}"
    );

    // Every metric the rules and the dashboard use is one the agent exports.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/oomguard.json")).unwrap())
            .unwrap();
    let exported: BTreeSet<String> = prom
        .api(&format!(
            "/api/v1/label/__name__/values?match[]={}",
            encode(r#"{job="oomguard"}"#)
        ))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let rule_exprs: Vec<String> = yaml("prometheus/rules.yaml")["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    let exprs = dashboard_exprs(&dashboard);
    let used: BTreeSet<String> = rule_exprs
        .iter()
        .chain(&exprs)
        .flat_map(|e| metric_names(e))
        .collect();
    assert!(used.len() >= 15, "{used:?}");
    for name in used {
        assert!(
            exported.contains(&name),
            "{name} is not exported: {exported:?}"
        );
    }

    // The dashboard: every expression parses and returns series for this agent.
    assert!(exprs.len() >= 15, "{exprs:?}");
    for expr in &exprs {
        let q = instantiate(expr);
        let result = prom.query(&q);
        assert!(!result.is_empty(), "no series for the dashboard's {q}");
    }
    // The node variable lists this node.
    let node_query = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "node")
        .unwrap()["definition"]
        .as_str()
        .unwrap()
        .to_string();
    let matcher = node_query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(", node)"))
        .unwrap();
    let nodes = prom.api(&format!(
        "/api/v1/label/node/values?match[]={}",
        encode(matcher)
    ));
    assert_eq!(nodes, serde_json::json!([NODE]));
    // The kill shows on the dashboard's panels, not just in the raw counter.
    let by_policy = exprs
        .iter()
        .find(|e| e.contains("oomguard_kills_total") && e.contains("by (node, policy)"))
        .expect("a kills-by-policy-and-node panel");
    let shown = prom.query(&instantiate(by_policy));
    let value = |policy: &str| -> f64 {
        let s = shown
            .iter()
            .find(|s| s["metric"]["policy"] == policy && s["metric"]["node"] == NODE)
            .unwrap_or_else(|| panic!("no {policy} series: {shown:?}"));
        s["value"][1].as_str().unwrap().parse().unwrap()
    };
    assert!(value("process") > 0.0, "{shown:?}");
    assert_eq!(value("container"), 0.0, "{shown:?}");
}

/// deploy/prometheus/prometheus.yml (for a Prometheus without the Operator) keeps the
/// agent pods' port named `metrics`, names the job and the node label as the rules and the
/// dashboard expect, and loads rules.yaml.
#[test]
fn the_example_scrape_config_keeps_the_agents_metrics_port() {
    let config = yaml("prometheus/prometheus.yml");
    assert_eq!(config["rule_files"], serde_json::json!(["rules.yaml"]));
    let jobs = config["scrape_configs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job["job_name"], "oomguard");
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"], "pod");

    let ds = yaml("daemonset.yaml");
    let template = &ds["spec"]["template"];
    assert_eq!(
        sd["namespaces"]["names"],
        serde_json::json!([ds["metadata"]["namespace"]])
    );
    let relabel = job["relabel_configs"].as_array().unwrap();
    let keep = relabel.iter().find(|r| r["action"] == "keep").unwrap();
    assert_eq!(
        keep["source_labels"],
        serde_json::json!([
            "__meta_kubernetes_pod_label_app_kubernetes_io_name",
            "__meta_kubernetes_pod_container_port_name"
        ])
    );
    let app = template["metadata"]["labels"]["app.kubernetes.io/name"]
        .as_str()
        .unwrap();
    let port = template["spec"]["containers"][0]["ports"][0]["name"]
        .as_str()
        .unwrap();
    assert_eq!(port, "metrics");
    // Prometheus anchors relabel regexes: this is an exact match.
    assert_eq!(keep["regex"], format!("{app};{port}"));
    assert!(relabel.iter().any(|r| {
        r["source_labels"] == serde_json::json!(["__meta_kubernetes_pod_node_name"])
            && r["target_label"] == "node"
    }));
}
