//! The alert rules and the Grafana dashboards: promtool checks the rules and
//! runs their unit tests, checks every dashboard expression, and every
//! metric name they use must be one a running hub or node exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use omnirelay_tests::{PrometheusTools, WorkspaceBinaries, workspace_root};
use serde_json::Value;

use super::{exposed_names, wait_for_ok};

fn chart_dir() -> PathBuf {
    workspace_root().join("helm/omnirelay-hub")
}

fn rules_file() -> PathBuf {
    chart_dir().join("files/alerts/omnirelay.rules.yaml")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let tools = PrometheusTools::find().unwrap_or_else(|err| panic!("{err}"));
    let output = Command::new(&tools.promtool).args(args).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// The alert names of a rules file, in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|line| line.trim().strip_prefix("- alert: ")).map(|name| name.trim().to_string()).collect()
}

/// The PromQL expressions of the rules file (`expr:` values, single-line or
/// `|` blocks).
fn rule_expressions(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                break;
            }
            block.push_str(next.trim());
            block.push(' ');
            lines.next();
        }
        out.push(block);
    }
    out
}

/// Every dashboard expression (panel targets, nested rows included, and the
/// template variables' `label_values(...)` queries), with Grafana's
/// variables replaced by values PromQL accepts.
fn dashboard_expressions() -> Vec<(String, String)> {
    fn walk(panels: &Value, file: &str, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((format!("{file}: {}", panel["title"]), expr.to_string()));
                }
            }
            walk(&panel["panels"], file, out);
        }
    }
    let mut out = Vec::new();
    let dir = chart_dir().join("files/dashboards");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).expect("the dashboards folder").flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let dashboard: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read a dashboard")).expect("dashboards are JSON");
        walk(&dashboard["panels"], &file, &mut out);
        for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(query) = variable["query"]["query"].as_str() {
                // label_values(metric, label) -> the metric selector.
                let inner = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(m, _)| m);
                out.push((format!("{file}: variable {}", variable["name"]), inner.unwrap_or(query).to_string()));
            }
        }
    }
    out.into_iter()
        .map(|(where_, expr)| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h")
                .replace("$shard", ".*")
                .replace("$job", ".*");
            (where_, expr)
        })
        .collect()
}

/// Metric names in a PromQL expression: the identifiers outside quotes
/// that name OmniRelay's metrics, or `up`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut quoted = false;
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            quoted = !quoted;
            word.clear();
        } else if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
        } else {
            if word.starts_with("omnirelay_") || word == "up" {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_has_a_unit_test_and_a_runbook() {
    let rules = rules_file();
    let (ok, out) = promtool(&["check", "rules", rules.to_str().expect("UTF-8 path")]);
    assert!(ok, "promtool check rules:\n{out}");

    let tests = workspace_root().join("helm/tests/alerts.test.yaml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().expect("UTF-8 path")]);
    assert!(ok, "promtool test rules:\n{out}");

    let rules_text = std::fs::read_to_string(&rules).expect("read the rules");
    let tests_text = std::fs::read_to_string(&tests).expect("read the rule tests");
    let runbooks = std::fs::read_to_string(workspace_root().join("docs/runbooks.md")).expect("read docs/runbooks.md");
    let alerts = alert_names(&rules_text);
    assert!(alerts.len() >= 16, "{alerts:?}");
    for alert in &alerts {
        // Fired in a test: only an expected firing alert carries the
        // annotations, and with them the runbook's anchor.
        let fired = tests_text.contains(&format!("alertname: {alert}\n"))
            && tests_text.contains(&format!("runbooks.md#{}\n", alert.to_lowercase()));
        assert!(fired, "{alert} has no promtool unit test that fires it");
        assert!(runbooks.contains(&format!("\n## {alert}\n")), "docs/runbooks.md has no section `## {alert}`");
        assert!(
            rules_text.contains(&format!("docs/runbooks.md#{}", alert.to_lowercase())),
            "{alert}'s runbook_url does not point at its section"
        );
    }
}

#[test]
fn dashboard_expressions_pass_promtool() {
    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 40, "{} expressions", expressions.len());
    // promtool parses and checks expressions as recording rules.
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (index, (where_, expr)) in expressions.iter().enumerate() {
        rules.push_str(&format!(
            "      # {}\n      - record: omnirelay_dashboard_check_{index}\n        expr: {}\n",
            where_.replace('\n', " "),
            serde_json::to_string(expr).expect("a JSON string is a YAML string")
        ));
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("dashboards.rules.yaml");
    std::fs::write(&path, rules).expect("write the expressions");
    let (ok, out) = promtool(&["check", "rules", path.to_str().expect("UTF-8 path")]);
    assert!(ok, "promtool refused a dashboard expression:\n{out}");
    assert!(out.contains(&format!("SUCCESS: {} rules found", expressions.len())), "{out}");
}

/// A running hub (embedded store) and node, with some traffic through the
/// node so every series exists; their `/metrics` text.
pub(super) async fn scrape_a_running_hub_and_node() -> (String, String) {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build)
        .await
        .expect("build task")
        .unwrap_or_else(|err| panic!("{err}"));
    let dir = tempfile::tempdir().expect("temporary directory");
    // PostgreSQL, as in production: the pool's gauges exist only there.
    let db = omnirelay_tests::TestDb::new().await;
    let hub = super::prometheus::Hub::start_on_postgres(&binaries.hub, dir.path(), db.url()).await;
    // The node replicates to the hub, as in production: the replication
    // series exist only there.
    let node = super::prometheus::Node::start_on_hub(&binaries.omnirelay, dir.path(), hub.grpc);
    wait_for_ok(hub.admin, "/readyz").await;
    wait_for_ok(node.control, "/readyz").await;
    let _subscription = hub.exercise().await;
    node.exercise().await;
    node.eject_a_worker().await;
    let hub_text = wait_for_ok(hub.admin, "/metrics").await;
    let node_text = wait_for_ok(node.control, "/metrics").await;
    (hub_text, node_text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_dashboards_use_is_exported_by_the_binaries() {
    let (hub, node) = scrape_a_running_hub_and_node().await;
    let exported: BTreeSet<String> = exposed_names(&hub).into_iter().chain(exposed_names(&node)).collect();
    assert!(exported.contains("omnirelay_hub_ready") && exported.contains("omnirelay_resourcelease_pending"));

    let rules = std::fs::read_to_string(rules_file()).expect("read the rules");
    let mut used: Vec<(String, String)> = Vec::new();
    for expr in rule_expressions(&rules) {
        used.extend(metric_names(&expr).into_iter().map(|name| (name, "alert rules".to_string())));
    }
    for (where_, expr) in dashboard_expressions() {
        used.extend(metric_names(&expr).into_iter().map(|name| (name, where_.clone())));
    }
    assert!(used.len() > 50, "{used:?}");
    let mut missing = BTreeSet::new();
    for (name, where_) in &used {
        // `up` is Prometheus' own series for every target.
        if name == "up" || exported.contains(name) {
            continue;
        }
        missing.insert(format!("{name} (used by {where_})"));
    }
    assert!(missing.is_empty(), "metrics no binary exports:\n{}", missing.into_iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn metric_names_are_read_from_expressions_without_labels_or_values() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (le, shard) (rate(omnirelay_a_seconds_bucket{shard=~"omnirelay_x"}[5m]))) / up"#,
    );
    assert_eq!(names, BTreeSet::from(["omnirelay_a_seconds_bucket".to_string(), "up".to_string()]));
}
