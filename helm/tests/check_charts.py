"""Checks the Helm charts under helm/ with the real tools, without a cluster.

For every chart and every values set (the defaults, then each file in the
chart's ci/ folder):

1. Helm's linter (helm-python-sdk wraps Helm's own Go SDK): no warning or
   error, strict mode.
2. Helm's renderer, for an install and for an upgrade (hooks included).
3. kubernetes-validate (Kubernetes' published OpenAPI schemas, strict: unknown
   fields are errors) on every rendered manifest of a built-in kind; the
   Prometheus Operator's kinds (ServiceMonitor, PrometheusRule), whose schemas
   kubernetes-validate does not ship, against the fields the operator's CRDs
   require; every PrometheusRule's rule groups through `promtool check rules`.
4. Values the chart must refuse (values.schema.json, or a `fail` in the
   templates) are refused, with the expected message.

Then it prints one JSON document on stdout: per chart and values set, the
rendered workload containers (args, env, ports, probes, volume mounts and
the volumes' sources), which the Rust test starts the real binaries with.

Usage: check_charts.py HELM_DIR PROMTOOL KUBERNETES_VERSION
Exit status 1 with the findings on stderr when anything fails.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

import helm_python
import kubernetes_validate
import yaml

# Values the charts must refuse, and a fragment of the reason each names.
REFUSED = {
    "omnirelay-hub": [
        ({"replicaCount": "three"}, "/replicaCount"),
        ({"database": {"tls": "on"}}, "/database/tls"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"healthInterval": "5"}, "/healthInterval"),
        ({"replicaCount": 3}, "needs PostgreSQL"),
        ({"database": {"existingSecret": "db", "tls": "verify-full"}}, "needs database.caSecret"),
        ({"tls": {"clientCaSecret": "ca"}}, "needs tls.existingSecret"),
        ({"database": {"existingSecret": "db", "poolSize": 4, "committers": 4}}, "fewer than database.poolSize"),
    ],
    "omnirelay-node": [
        ({"replicaCount": 0}, "/replicaCount"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"tls": {"clientCaSecret": "ca"}}, "needs tls.existingSecret"),
        ({"replicator": {"kind": "sqlite"}, "replicaCount": 2}, "one replica only"),
        (
            {"replicator": {"kind": "sqlite"}, "config": {"namespaces": ["resourcelease"], "hub": {"endpoints": ["http://hub:7400"]}}},
            "config.hub.endpoints",
        ),
        ({"replicator": {"kind": "postgres"}}, "/replicator/kind"),
    ],
}

# The fields of the Prometheus Operator's CRDs (monitoring.coreos.com/v1) that
# the charts use, as JSON schemas: kubernetes-validate has no schema for them.
OPERATOR_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                "scheme": {"enum": ["http", "https"]},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {"groups": {"type": "array", "minItems": 1}},
            },
        },
    },
}

WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}


class Findings:
    def __init__(self):
        self.problems = []

    def add(self, where, text):
        self.problems.append(f"{where}: {text}")


def values_sets(chart_dir):
    sets = [("default", {})]
    ci = chart_dir / "ci"
    if ci.is_dir():
        for path in sorted(ci.glob("*-values.yaml")):
            sets.append((path.name[: -len("-values.yaml")], yaml.safe_load(path.read_text()) or {}))
    return sets


def lint(chart_dir, name, values, kube_version, findings):
    report = helm_python.lint(str(chart_dir), values, strict=True, kube_version=f"v{kube_version}")
    for message in report.get("messages", []):
        # Severity 1 is informational (e.g. "icon is recommended").
        if message.get("severity", 0) >= 2:
            findings.add(f"{chart_dir.name} [{name}] helm lint", f"{message.get('path')}: {message.get('error')}")
    for error in report.get("errors", []):
        findings.add(f"{chart_dir.name} [{name}] helm lint", error)


def documents(rendered):
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield template, doc


def check_operator_kind(where, doc, promtool, findings):
    import jsonschema

    try:
        jsonschema.validate(doc, OPERATOR_SCHEMAS[doc["kind"]])
    except jsonschema.ValidationError as err:
        findings.add(where, f"{doc['kind']} does not match the operator's schema: {err.message}")
        return
    if doc["kind"] == "PrometheusRule":
        with tempfile.NamedTemporaryFile("w", suffix=".rules.yaml", delete=False) as rules:
            yaml.safe_dump({"groups": doc["spec"]["groups"]}, rules)
        result = subprocess.run([promtool, "check", "rules", rules.name], capture_output=True, text=True)
        pathlib.Path(rules.name).unlink()
        if result.returncode != 0:
            findings.add(where, f"promtool check rules refused the PrometheusRule:\n{result.stdout}{result.stderr}")


def container_plan(doc):
    pod = doc["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    plan = []
    for container in pod["containers"]:
        mounts = []
        for mount in container.get("volumeMounts", []):
            mounts.append(
                {
                    "mount_path": mount["mountPath"],
                    "sub_path": mount.get("subPath"),
                    "volume": volumes.get(mount["name"], {}),
                }
            )
        plan.append(
            {
                "name": container["name"],
                "image": container["image"],
                "command": container.get("command", []),
                "args": container.get("args", []),
                "env": container.get("env", []),
                "ports": container.get("ports", []),
                "startup_probe": container.get("startupProbe"),
                "liveness_probe": container.get("livenessProbe"),
                "readiness_probe": container.get("readinessProbe"),
                "mounts": mounts,
                "security_context": container.get("securityContext", {}),
            }
        )
    return plan


def documented_keys(values_path):
    """The keys of values.yaml preceded by a helm-docs `# --` comment."""
    keys, stack, pending = [], [], False
    for line in values_path.read_text().splitlines():
        text = line.strip()
        if text.startswith("# --"):
            pending = True
            continue
        if not text or text.startswith("#") or text.startswith("- "):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, text.split(":", 1)[0]))
        if pending:
            keys.append(".".join(key for _, key in stack))
            pending = False
    return keys


def check_docs(chart_dir, findings):
    """Every top-level value is documented, and the README lists every
    documented key (helm-docs style)."""
    keys = documented_keys(chart_dir / "values.yaml")
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    for top in values:
        if not any(key == top or key.startswith(top + ".") for key in keys):
            findings.add(f"{chart_dir.name} values.yaml", f"{top} has no `# --` description")
    readme = (chart_dir / "README.md").read_text()
    for key in keys:
        if f"| `{key}` |" not in readme:
            findings.add(f"{chart_dir.name} README.md", f"the values table lacks `{key}`")


def check_chart(chart_dir, promtool, kube_version, findings):
    check_docs(chart_dir, findings)
    chart = helm_python.Chart.load(str(chart_dir))
    result = {}
    for name, values in values_sets(chart_dir):
        lint(chart_dir, name, values, kube_version, findings)
        plans = {"kinds": [], "workloads": {}}
        for install in (True, False):
            try:
                rendered = chart.render(
                    values, name="omnirelay", namespace="omnirelay", is_install=install, is_upgrade=not install
                )
            except helm_python.HelmError as err:
                findings.add(f"{chart_dir.name} [{name}]", f"render failed: {err}")
                continue
            for template, doc in documents(rendered):
                where = f"{chart_dir.name} [{name}] {template} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                if doc.get("kind") in OPERATOR_SCHEMAS:
                    check_operator_kind(where, doc, promtool, findings)
                else:
                    try:
                        kubernetes_validate.validate(doc, kube_version, strict=True)
                    except kubernetes_validate.ValidationError as err:
                        findings.add(where, f"kubernetes-validate: {str(err).splitlines()[0]}")
                    except kubernetes_validate.SchemaNotFoundError:
                        findings.add(where, "kubernetes-validate has no schema for this kind")
                if install:
                    plans["kinds"].append(doc["kind"])
                    if doc["kind"] in WORKLOAD_KINDS:
                        plans["workloads"][doc["kind"]] = {
                            "name": doc["metadata"]["name"],
                            "annotations": doc["metadata"].get("annotations", {}),
                            "replicas": doc["spec"].get("replicas"),
                            "strategy": doc["spec"].get("strategy", {}),
                            "pod_security_context": doc["spec"]["template"]["spec"].get("securityContext", {}),
                            "termination_grace_period_seconds": doc["spec"]["template"]["spec"].get(
                                "terminationGracePeriodSeconds"
                            ),
                            "containers": container_plan(doc),
                        }
                    if doc["kind"] == "ConfigMap":
                        plans.setdefault("config_maps", {})[doc["metadata"]["name"]] = doc.get("data", {})
        result[name] = plans

    for values, reason in REFUSED.get(chart_dir.name, []):
        try:
            chart.render(values, name="omnirelay", namespace="omnirelay")
        except helm_python.HelmError as err:
            if reason not in str(err):
                findings.add(f"{chart_dir.name} refuses {values}", f"but the reason does not name {reason!r}: {err}")
            continue
        findings.add(f"{chart_dir.name} refuses {values}", "the chart rendered it")
    return result


def main():
    helm_dir, promtool, kube_version = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    findings = Findings()
    charts = sorted(path.parent for path in helm_dir.glob("*/Chart.yaml"))
    if not charts:
        findings.add(str(helm_dir), "no charts found")
    out = {chart.name: check_chart(chart, promtool, kube_version, findings) for chart in charts}
    if findings.problems:
        print("\n".join(findings.problems), file=sys.stderr)
        sys.exit(1)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
