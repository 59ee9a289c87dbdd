"""Schemathesis over the whole OpenAPI document against a live server: no 500, no response
that breaks the document, problem+json everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentsvc.services import api_key_create
from tests.conftest import ROOT, fake

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_schemathesis_finds_nothing(live_server_url, worker, make_chain, tmp_path: Path):
    # A chain that accepts any object input, so valid generated bodies can really start runs.
    make_chain("demo", models=[fake(tokens=2)], schema={"type": "object"})
    _, key = api_key_create(
        owner_name="fuzz",
        name="fuzz",
        requests_per_minute=1_000_000,
        runs_per_minute=1_000_000,
        tokens_per_minute=100_000_000,
        max_active_runs=1_000_000,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{live_server_url}/api/v1/schema",
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "all",
            # Valid-looking values the document cannot rule out are still refused, rightly: a run's
            # input against its chain's own JSON Schema, opaque cursors, unknown chain filters.
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-time",
            "60",
            # /invoke may wait up to INVOKE_WAIT_MAX_S for its run when the worker is busy.
            "--request-timeout",
            "90",
            "--max-response-time",
            "90",
            "--workers",
            "1",
            "--seed",
            "1",
            "--output-sanitize",
            "false",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
