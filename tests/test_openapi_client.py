"""A client nobody here wrote: openapi-python-client's, generated from docs/openapi.json as its
README says, driving a live server and the suite's executor. Its stream call parsed the events
as a JSON object and crashed, while the document described them so."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, fake, wait_until
from tests.sse_client import events

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PACKAGE = "agentsvc_api"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The generated package, importable (its modules: one per tag of the document)."""
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run over the generated code
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [
            str(generator),
            "generate",
            "--path",
            str(ROOT / "docs" / "openapi.json"),
            "--output-path",
            str(out / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def module(name: str):
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_create_poll_stream_and_cancel_through_the_generated_client(
    api, live_server_url, worker, alice, make_chain
):
    runs = {
        name: module(f"api.runs.runs_{name}") for name in ("create", "retrieve", "stream", "cancel")
    }
    models = module("models")
    client = api.AuthenticatedClient(base_url=live_server_url, token=alice.raw_key)
    make_chain("demo", models=[fake(tokens=5)])
    make_chain("slow", models=[fake(tokens=400, latency_ms=20)])
    body = {"input": {"topic": "tides"}}

    handle = runs["create"].sync(
        "demo", client=client, body=models.RunCreateInputRequest.from_dict(body)
    )
    assert isinstance(handle, models.RunHandle), handle
    assert handle.status == models.RunStatusEnum.QUEUED

    # The poll, with the other scheme of the document: the key in X-API-Key.
    by_header = api.AuthenticatedClient(
        base_url=live_server_url, token=alice.raw_key, prefix="", auth_header_name="X-API-Key"
    )
    run = poll_until_ended(runs["retrieve"], models, handle.run_id, by_header)
    assert run.status == models.RunStatusEnum.COMPLETED
    assert "tides" in run.output

    # The stream: text, as the document says, which any SSE reader parses.
    text = runs["stream"].sync("demo", client=client, body=models.RunsStreamBody.from_dict(body))
    assert isinstance(text, str), text
    frames = list(events(iter(text.splitlines())))
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    assert frames[0].event == "run.queued" and frames[-1].event == "run.completed"

    slow = runs["create"].sync(
        "slow", client=client, body=models.RunCreateInputRequest.from_dict(body)
    )
    cancelled = runs["cancel"].sync_detailed(slow.run_id, client=client)
    assert cancelled.status_code in (200, 202), cancelled.content
    assert isinstance(cancelled.parsed, models.RunOut)
    assert cancelled.parsed.cancel_requested
    run = poll_until_ended(runs["retrieve"], models, slow.run_id, client)
    assert run.status == models.RunStatusEnum.CANCELLED


def poll_until_ended(retrieve, models, run_id, client):
    """runs_retrieve until the run has ended, as a client polls it."""

    def ended():
        run = retrieve.sync(run_id, client=client)
        assert isinstance(run, models.RunOut), run
        return run if run.status.value not in ("queued", "running") else None

    return wait_until(ended, 30, 0.1, "the run to end")
