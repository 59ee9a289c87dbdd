from __future__ import annotations

import sys

import httpx
import pytest
from django.test import Client

from agentsvc.demo_model_server import start_in_thread
from tests.conftest import (
    ExecutorProcess,
    Proc,
    fake,
    free_port,
    process_env,
    start_web,
    wait_until,
)


def readyz(client=None):
    response = (client or Client()).get("/readyz")
    assert response["Content-Type"] == "application/json"
    return response.status_code, response.json()


def test_healthz_checks_nothing(db):
    assert Client().get("/healthz").json() == {"status": "ok"}


def test_ready_with_worker_and_models(db, worker, qcluster, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    _status, body = wait_until(lambda: (r := readyz())[0] == 200 and r, 15, 0.2, "ready")
    assert body["status"] == "ready"
    names = ("database", "migrations", "cache", "channel_layer", "broker", "workers", "executors")
    for name in names:
        check = body["checks"][name]
        assert check["ok"] is True, (name, check)
        assert set(check) == {"ok", "latency_ms", "detail"}
    assert [m["ok"] for m in body["checks"]["models"].values()] == [True]


def test_readiness_checks_are_for_operators_only(db, worker, qcluster, make_chain, settings):
    """An outside probe read the database, cache, channel layer, worker count and model names
    from /readyz. The status stays public; the checks need the metrics token or a direct
    request from READYZ_DETAIL_NETWORKS (loopback by default, while no token is set)."""
    make_chain("demo", models=[fake(tokens=3)])
    wait_until(lambda: readyz()[0] == 200, 15, 0.2, "ready")
    outside = Client(REMOTE_ADDR="203.0.113.9")
    assert readyz(outside) == (200, {"status": "ready"})
    # Through a proxy on this machine: the proxy's loopback address says nothing of the caller.
    for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        assert readyz(Client(headers=header)) == (200, {"status": "ready"})
    assert set(readyz()[1]) == {"status", "checks"}  # direct from loopback
    settings.READYZ_DETAIL_NETWORKS = ["203.0.113.0/24"]
    assert set(readyz(outside)[1]["checks"]) >= {"database", "workers", "models"}

    settings.METRICS_TOKEN = "s3cret"
    settings.READYZ_DETAIL_NETWORKS = []  # what the default is once a token is set
    assert readyz() == (200, {"status": "ready"})
    assert readyz(Client(headers={"Authorization": "Bearer nope"})) == (200, {"status": "ready"})
    with_token = Client(REMOTE_ADDR="203.0.113.9", headers={"Authorization": "Bearer s3cret"})
    assert readyz(with_token)[1]["checks"]["workers"]["ok"] is True

    # Not ready: the status code and status say so to everyone, the reason only to operators.
    settings.MODEL_PROBE_CACHE_S = 0
    make_chain("demo", base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert readyz(outside) == (503, {"status": "not_ready"})
    assert readyz(with_token)[1]["checks"]["models"]


def test_model_down_makes_not_ready_and_recovers(db, worker, qcluster, make_chain, settings, alice):
    settings.MODEL_PROBE_CACHE_S = 0
    port = free_port()
    make_chain("demo", base_url=f"http://127.0.0.1:{port}/v1")
    status, body = readyz()
    assert status == 503 and body["status"] == "not_ready"
    (model,) = body["checks"]["models"].values()
    assert model["ok"] is False and "cannot reach" in model["detail"]
    assert alice.get("/api/v1/chains/demo").json()["available"] is False

    server = start_in_thread(port=port)
    try:
        status, body = wait_until(lambda: (r := readyz())[0] == 200 and r, 15, 0.2, "ready")
        assert alice.get("/api/v1/chains/demo").json()["available"] is True
    finally:
        server.shutdown()
        server.server_close()


def test_model_not_served_is_unavailable(db, worker, make_chain, settings):
    settings.MODEL_PROBE_CACHE_S = 0
    server = start_in_thread(models=["some-other-model"])
    try:
        make_chain("demo", base_url=server.base_url)
        status, body = readyz()
        assert status == 503
        (model,) = body["checks"]["models"].values()
        assert "not served" in model["detail"]
    finally:
        server.shutdown()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_no_worker_is_not_ready_until_one_starts(tmp_path):
    env = process_env(Q_CLUSTER_NAME=f"lonely-{free_port()}")
    web, base = start_web(env, tmp_path / "web.log")
    worker = executor = None
    try:

        def status():
            return httpx.get(f"{base}/readyz", timeout=30).status_code

        response = httpx.get(f"{base}/readyz", timeout=30)
        assert response.status_code == 503
        assert response.json()["checks"]["workers"]["ok"] is False
        assert response.json()["checks"]["executors"]["ok"] is False
        worker = Proc([sys.executable, "manage.py", "qcluster"], env, tmp_path / "q.log")
        executor = ExecutorProcess(tmp_path / "executor.log")
        wait_until(lambda: status() == 200, 30, 0.3, "ready with a worker and an executor")
        executor.terminate()  # a stopping executor says so at once
        body = wait_until(
            lambda: (r := httpx.get(f"{base}/readyz", timeout=30)).status_code == 503 and r.json(),
            30,
            0.3,
            "not ready without an executor",
        )
        assert body["checks"]["executors"]["ok"] is False and body["checks"]["workers"]["ok"]
        worker.stop()
        worker = None
        wait_until(lambda: status() == 503, 30, 0.3, "not ready without a worker")
    finally:
        web.stop()
        if executor:
            executor.kill()
        if worker:
            worker.stop()


@pytest.mark.slow
def test_database_down_is_503_not_500(tmp_path):
    env = process_env()
    env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{free_port()}/nothing"
    web, base = start_web(env, tmp_path / "web.log")
    try:
        response = httpx.get(f"{base}/readyz", timeout=60)
        assert response.status_code == 503
        assert response.json()["checks"]["database"]["ok"] is False
        api = httpx.get(
            f"{base}/api/v1/runs", headers={"Authorization": "Bearer ak_" + "x" * 40}, timeout=60
        )
        assert api.status_code == 503
        assert api.headers["Content-Type"] == "application/problem+json"
        assert api.json()["code"] == "service_unavailable"
        assert api.headers["Retry-After"]
    finally:
        web.stop()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_follow_runs(alice, make_chain):
    from agentsvc.models import ApiKey

    make_chain("demo")
    client = Client()
    before = client.get("/metrics").content.decode()
    ApiKey.objects.filter(pk=alice.key.pk).update(runs_per_minute=1)
    run_id = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}}).json()["run_id"]
    alice.post(f"/api/v1/runs/{run_id}/cancel")
    assert alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}}).status_code == 429
    after = client.get("/metrics")
    assert after["Content-Type"].startswith("text/plain")
    text = after.content.decode()
    cancelled = 'agentsvc_runs_finished_total{chain="demo",status="cancelled"}'
    assert metric(text, cancelled) == metric(before, cancelled) + 1
    rejected = 'agentsvc_rejections_total{reason="rate_limited"}'
    assert metric(text, rejected) == metric(before, rejected) + 1
    assert "agentsvc_queue_depth" in text
    assert "agentsvc_run_duration_seconds_bucket" in text
    assert 'agentsvc_webhook_attempts_total{outcome="succeeded"}' in text
    assert "agentsvc_open_streams" in text


def test_metrics_token(db, settings):
    settings.METRICS_TOKEN = "s3cret"
    client = Client()
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
