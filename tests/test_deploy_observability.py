"""The Grafana dashboard and the Prometheus alerts: well-formed, and every series they query
is one /metrics exposes. `promtool check rules` and the rules' unit tests run where promtool
is installed (.ci/run installs Debian's prometheus package for it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from django.test import Client

from tests.conftest import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "agentsvc.json"
SERIES = re.compile(r"\bagentsvc_[a-z_]+")


def families(db) -> set[str]:
    text = Client().get("/metrics").content.decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def family_of(series: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def test_alert_rules_are_well_formed_and_query_real_series(db):
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {
        "AgentsvcQueueAgeHigh",
        "AgentsvcRunFailureRateHigh",
        "AgentsvcWebhookBacklog",
        "AgentsvcNotReady",
        "AgentsvcNoExecutorAlive",
    } <= names
    known = {family_of(name) for name in families(db)}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["for"], rule["alert"]
        for series in SERIES.findall(rule["expr"]):
            assert family_of(series) in known, (rule["alert"], series)


def test_dashboard_is_valid_json_and_queries_real_series(db):
    dashboard = json.loads(DASHBOARD.read_text())
    known = {family_of(name) for name in families(db)}
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Runs per minute by status", "Queue depth and age", "Run duration quantiles"} <= titles
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for series in SERIES.findall(expr):
            assert family_of(series) in known, (expr, series)


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed")
def test_promtool_checks_and_unit_tests_the_rules():
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
