"""The `agentsvc` console script, run as a subprocess against the live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs.models import Run
from tests.conftest import fake, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SCRIPT = str(Path(sys.executable).parent / "agentsvc")


@pytest.fixture
def cli(live_server_url, worker, alice):
    def run(*args: str, key: str | None = None, url: str | None = None):
        env = {**os.environ, "AGENTSVC_URL": url or live_server_url}
        env["AGENTSVC_API_KEY"] = key or alice.raw_key
        return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=90)

    yield run
    wait_until(
        lambda: not Run.objects.filter(status__in=["queued", "running"]).exists(),
        60,
        message="runs to end",
    )


def test_run_stream_prints_tokens_live_and_a_summary(cli, make_chain):
    make_chain("demo", models=[fake(tokens=5), fake(tokens=4)])
    done = cli("run", "demo", "--input", '{"topic": "tides"}', "--stream")
    assert done.returncode == 0, done.stderr
    run = Run.objects.get()
    assert run.output in done.stdout.replace("\n", "")
    assert "[agent0]" in done.stderr and "[agent1]" in done.stderr
    assert f"run       {run.id}" in done.stdout
    assert "status    completed" in done.stdout
    assert f"cost      ${run.cost}" in done.stdout
    assert "tokens    " in done.stdout and " 9 out," in done.stdout
    assert "duration  " in done.stdout


def test_run_wait_shows_progress_and_json_for_scripts(cli, make_chain):
    make_chain("demo", models=[fake(tokens=3), fake(tokens=3)])
    waited = cli("run", "demo", "--input", '{"topic": "tides"}', "--wait")
    assert waited.returncode == 0, waited.stderr
    assert "agents 2/2" in waited.stderr
    assert "status    completed" in waited.stdout
    as_json = cli("run", "demo", "--input", '{"topic": "tides"}', "--wait", "--json")
    assert as_json.returncode == 0
    run = json.loads(as_json.stdout)
    assert run["status"] == "completed" and run["usage"]["output_tokens"] == 6
    streamed = cli("--json", "run", "demo", "--input", '{"topic": "x"}', "--stream")
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["event"] == "run.completed"


def test_a_failed_run_exits_non_zero(cli, make_chain):
    make_chain("broken", models=[fake(fail=400)])
    failed = cli("run", "broken", "--input", '{"topic": "tides"}', "--wait")
    assert failed.returncode == 1
    assert "status    failed" in failed.stdout and "error     provider_error" in failed.stdout


def test_runs_list_get_cancel_and_chains(cli, make_chain):
    make_chain("demo", models=[fake(tokens=2)], description="Short")
    started = cli("run", "demo", "--input", '{"topic": "tides"}')
    assert started.returncode == 0
    run_id = started.stdout.strip()
    wait_until(lambda: Run.objects.get(pk=run_id).status == "completed", 30)
    listed = cli("runs", "list")
    assert run_id in listed.stdout and "completed" in listed.stdout
    got = json.loads(cli("runs", "get", run_id, "--json").stdout)
    assert got["run_id"] == run_id and got["status"] == "completed"
    refused = cli("runs", "cancel", run_id)
    assert refused.returncode == 3 and "run_not_cancellable" in refused.stderr
    make_chain("slow", models=[fake(tokens=200, latency_ms=100)])
    slow_id = cli("run", "slow", "--input", '{"topic": "tides"}').stdout.strip()
    cancelled = cli("runs", "cancel", slow_id, "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["run_id"] == slow_id
    wait_until(lambda: Run.objects.get(pk=slow_id).status == "cancelled", 30)
    chains = cli("chains")
    assert "demo" in chains.stdout and "Short" in chains.stdout
    assert {c["name"] for c in json.loads(cli("chains", "--json").stdout)} == {"demo", "slow"}


def test_wait_gives_up_with_its_own_exit_code(cli, make_chain):
    make_chain("slow", models=[fake(tokens=200, latency_ms=100)])
    gave_up = cli("run", "slow", "--input", '{"topic": "x"}', "--wait", "--timeout", "1")
    assert gave_up.returncode == 5 and "the run goes on" in gave_up.stderr
    run = Run.objects.get()
    assert run.status in ("queued", "running")
    assert cli("runs", "cancel", str(run.id)).returncode == 0


def test_errors_and_usage(cli, make_chain):
    make_chain("demo", models=[fake(tokens=2)])
    invalid = cli("run", "demo", "--input", '{"topic": ""}')
    assert invalid.returncode == 3
    assert "validation_error" in invalid.stderr and "input.topic" in invalid.stderr
    assert cli("chains", key="ak_" + "x" * 40).returncode == 3
    bad_json = cli("run", "demo", "--input", "{topic")
    assert bad_json.returncode == 2 and "--input is not valid JSON" in bad_json.stderr
    assert cli("chains", url="http://127.0.0.1:9").returncode == 4
    assert Run.objects.count() == 0


def test_batch_rerun_and_filtered_stream(cli, make_chain, tmp_path):
    make_chain("demo", models=[fake(tokens=3)])
    items = tmp_path / "items.jsonl"
    items.write_text('{"topic": "a"}\n{"input": {"topic": "b"}, "metadata": {"n": 2}}\n')
    batch = cli("batch", "demo", "--items", str(items))
    assert batch.returncode == 0, batch.stderr
    ids = batch.stdout.split()
    assert [Run.objects.get(pk=i).input for i in ids] == [{"topic": "a"}, {"topic": "b"}]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"topic": "a"}, {"topic": ""}]')
    refused = cli("batch", "demo", "--items", str(bad))
    assert refused.returncode == 3 and "items[1].input.topic" in refused.stderr
    assert Run.objects.count() == 2
    wait_until(lambda: Run.objects.get(pk=ids[1]).status == "completed", 30)
    rerun = cli("runs", "rerun", ids[1], "--json")
    assert rerun.returncode == 0, rerun.stderr
    new = Run.objects.get(pk=json.loads(rerun.stdout)["run_id"])
    assert (str(new.rerun_of_id), new.metadata) == (ids[1], {"n": 2})
    streamed = cli(
        "--json", "run", "demo", "--input", '{"topic": "x"}', "--stream", "--events", "agent.output"
    )
    assert streamed.returncode == 0, streamed.stderr
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert lines and {e["event"] for e in lines} == {"agent.output"}


def test_endpoints_test_and_recover(cli, receiver, alice):
    from tests.webhook_support import hook_path
    from webhooks.services import endpoint_create

    path = hook_path()
    endpoint = endpoint_create(owner=alice.key.owner, url=receiver.base_url + path, events=[])
    sent = cli("endpoints", "test", str(endpoint.id))
    assert sent.returncode == 0 and "sent webhook.test" in sent.stdout, sent.stderr
    wait_until(lambda: receiver.requests_for(path), 30, message="the test event")
    recovered = cli(
        "endpoints", "recover", str(endpoint.id), "--since", "2000-01-01T00:00:00Z", "--json"
    )
    assert recovered.returncode == 0 and json.loads(recovered.stdout)["count"] == 0
    naive = cli("endpoints", "recover", str(endpoint.id), "--since", "2000-01-01T00:00:00")
    assert naive.returncode == 3 and "since" in naive.stderr
