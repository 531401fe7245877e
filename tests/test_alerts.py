"""monitoring/alerts.yml: the alert rules, unit-tested with promtool (Debian's prometheus
package), loaded by the compose stack's Prometheus, over metrics the processor exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from testkit.processes import require_tool
from tests.test_compose import exported_metric_names

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "alert_rules_test.yml"


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


def test_every_rule_passes_its_unit_tests(promtool):
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_is_tested_firing_and_not_firing():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            cases.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    rules = alert_rules()
    assert len(rules) >= 8
    for name in rules:
        assert cases.get(name) == {True, False}, f"{name}: firing and not firing, got {cases.get(name)}"
    assert set(cases) <= set(rules), f"tests of rules that do not exist: {set(cases) - set(rules)}"


def test_every_rule_says_how_bad_and_where_to_read_on():
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and "docs/operations.md" in rule["annotations"]["description"]
        assert f"`{name}`" in operations, f"{name} is not described in docs/operations.md"


def test_the_compose_prometheus_loads_the_rules(promtool):
    config = ROOT / "monitoring" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output
    assert yaml.safe_load(config.read_text())["rule_files"] == [RULES.name]
    # In the container the rules sit beside the config, where rule_files points.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert f"./monitoring/{RULES.name}:/etc/prometheus/{RULES.name}:ro" in volumes


def test_the_rules_use_only_metrics_the_processor_exports():
    used = set()
    for rule in alert_rules().values():
        used |= set(re.findall(r"\b(login_[a-z_]+)\b", rule["expr"]))
    assert used, "the rules use no processor metric"
    exported = exported_metric_names()
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_the_dashboard_shows_the_firing_alerts():
    import json

    dashboard = json.loads((ROOT / "monitoring" / "grafana" / "dashboards" / "login-analytics.json").read_text())
    [panel] = [p for p in dashboard["panels"] if any("ALERTS" in t["expr"] for t in p["targets"])]
    [target] = panel["targets"]
    assert target["expr"] == 'ALERTS{alertstate="firing"}' and target["instant"] and target["format"] == "table"
    assert target["datasource"]["uid"] == panel["datasource"]["uid"] == "prometheus"
    assert panel["gridPos"]["y"] == 0  # first thing on the dashboard
