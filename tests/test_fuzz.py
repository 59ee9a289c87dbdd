"""Schemathesis over the whole OpenAPI document against a live server: no 500, no response
that breaks the document, problem+json everywhere.

Every operation gets valid-looking and invalid data (`--mode all`), then the stateful phase
follows the document's links (a new run to its poll, cancel, events and deliveries; a new
endpoint to its own calls). Generated chain names and webhook URLs rarely exist, so half of
them are drawn from a dictionary of ones that do: the chain the test publishes and the local
receiver (the live server lets the SSRF guard pass loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentsvc.services import api_key_create
from tests.conftest import ROOT, fake

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CONFIG = """
[dictionaries.chains]
values = ["demo"]

[dictionaries.receivers]
values = ["{receiver}/hook"]

[parameters]
"path.name" = {{ dictionary = "chains", probability = 0.5 }}
"body.url" = {{ dictionary = "receivers", probability = 0.5 }}
"body.webhook.url" = {{ dictionary = "receivers", probability = 0.5 }}
"""


def test_schemathesis_finds_nothing(
    live_server_url, worker, make_chain, receiver, tmp_path: Path, capsys
):
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
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(receiver=receiver.base_url))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{live_server_url}/api/v1/schema",
            "--header",
            f"Authorization: Bearer {key}",
            "--mode",
            "all",
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
            "junit,ndjson",
            "--report-dir",
            str(tmp_path),
        ],
        cwd=tmp_path,  # schemathesis keeps a cache in the working directory
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "tests" / "fuzz_hooks.py")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    out = result.stdout
    with capsys.disabled():  # the figures: cases per phase, links followed, totals
        print("\n" + out[out.find("Coverage (") : out.find("WARNINGS")] + out[out.find("API Op") :])
    assert "Tested: 30" in out, out
    covered = re.search(r"API Links: +(\d+) covered", out)
    assert covered and int(covered.group(1)) >= 10, out
