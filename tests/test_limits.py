from __future__ import annotations

import re
import time

import http_sf
import pytest

from agentsvc.models import ApiKey
from runs.execution.executor import run_execute
from runs.models import Run
from runs.services import token_reservation
from tests.conftest import fake
from tests.test_auth import assert_problem

BODY = {"input": {"topic": "tides"}}


def set_limits(api, **limits):
    ApiKey.objects.filter(pk=api.key.pk).update(**limits)


def create(api, chain="demo"):
    return api.post(f"/api/v1/chains/{chain}/runs", BODY)


def parse_ratelimit(response) -> tuple[dict, dict]:
    policy = dict(http_sf.parse(response["RateLimit-Policy"].encode(), tltype="list"))
    current = dict(http_sf.parse(response["RateLimit"].encode(), tltype="list"))
    return policy, current


def test_headers_are_structured_fields(alice, make_chain, settings):
    settings.RATE_REQUESTS_PER_MINUTE = 100
    make_chain("demo")
    response = alice.get("/api/v1/runs")
    policy, current = parse_ratelimit(response)
    assert policy["requests"] == {"q": 100, "w": 60}
    assert policy["tokens"] == {"q": settings.RATE_TOKENS_PER_MINUTE, "w": 60}
    assert current["requests"]["r"] == 99
    assert set(current) == {"requests"}
    assert 0 <= current["requests"]["t"] <= 60
    create(alice)
    assert parse_ratelimit(alice.get("/api/v1/runs"))[1]["requests"]["r"] == 97
    # Error answers carry them too.
    assert "RateLimit" in alice.get("/api/v1/chains/nope")


def test_request_limit_per_key(alice, bob, make_chain):
    make_chain("demo")
    set_limits(alice, requests_per_minute=3)
    for _ in range(3):
        assert alice.get("/api/v1/runs").status_code == 200
    problem = assert_problem(alice.get("/api/v1/runs"), 429, "rate_limited")
    assert problem["violated-policies"] == ["requests"]
    response = alice.get("/api/v1/runs")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert parse_ratelimit(response)[1]["requests"]["r"] == 0
    # Another key is not affected.
    assert bob.get("/api/v1/runs").status_code == 200


class Clock:
    """time.time(), moved only by the test: the moments at which a client calls."""

    def __init__(self, monkeypatch, now: float) -> None:
        self.now = now
        monkeypatch.setattr(time, "time", lambda: self.now)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.999])
def test_waiting_as_long_as_retry_after_says_is_enough(alice, monkeypatch, fraction):
    """A client that waits exactly Retry-After seconds gets in, and not a second earlier: it
    was one second short (a window is named by its last second, and counts through it)."""
    set_limits(alice, requests_per_minute=1)
    clock = Clock(monkeypatch, int(time.time()) + fraction)
    for _ in range(3):  # the next window's call comes exactly when Retry-After said
        assert alice.get("/api/v1/runs").status_code == 200
        refused = alice.get("/api/v1/runs")
        assert refused.status_code == 429
        wait = int(refused["Retry-After"])
        assert parse_ratelimit(refused)[1]["requests"]["t"] == wait
        clock.now += wait - 1
        assert alice.get("/api/v1/runs").status_code == 429
        clock.now += 1


def test_runs_per_minute(alice, make_chain):
    make_chain("demo")
    set_limits(alice, runs_per_minute=2)
    assert create(alice).status_code == 202
    assert create(alice).status_code == 202
    response = create(alice)
    problem = assert_problem(response, 429, "rate_limited")
    assert problem["violated-policies"] == ["runs"]
    assert int(response["Retry-After"]) >= 1
    assert Run.objects.count() == 2
    # Reads are still allowed.
    assert alice.get("/api/v1/runs").status_code == 200


def test_active_runs(alice, bob, make_chain):
    make_chain("demo")
    set_limits(alice, max_active_runs=2)
    first = create(alice).json()["run_id"]
    create(alice)
    response = create(alice)
    problem = assert_problem(response, 429, "concurrency_limit")
    assert problem["violated-policies"] == ["active_runs"]
    assert response["Retry-After"]
    assert create(bob).status_code == 202
    alice.post(f"/api/v1/runs/{first}/cancel")
    assert create(alice).status_code == 202


def active_slots(api) -> int:
    return ApiKey.objects.values_list("active_runs", flat=True).get(pk=api.key.pk)


def test_active_run_slots_follow_every_end(alice, make_chain):
    """A slot is taken at the start and given back once at the end, whichever way it ends."""
    make_chain("demo", models=[fake(tokens=2)])
    set_limits(alice, max_active_runs=3)
    runs = [create(alice).json()["run_id"] for _ in range(3)]
    assert active_slots(alice) == 3
    run_execute(run_id=runs[0])  # completed
    alice.post(f"/api/v1/runs/{runs[1]}/cancel")  # cancelled while queued
    alice.post(f"/api/v1/runs/{runs[1]}/cancel")  # again: no second release
    assert active_slots(alice) == 1
    assert [create(alice).status_code for _ in range(3)] == [202, 202, 429]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_active_runs_limit_holds_under_parallel_starts(live_server_url, alice, make_chain):
    """Forty starts at once against a limit of five: exactly five are accepted. The runs last
    seconds, so none ends (and frees its slot) during the burst, even if a worker takes them."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.conftest import wait_until

    make_chain("demo", models=[fake(tokens=30, latency_ms=200)])
    set_limits(alice, max_active_runs=5)
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    with httpx.Client(base_url=live_server_url, headers=headers, timeout=30) as http:

        def start(_):
            response = http.post("/api/v1/chains/demo/runs", json=BODY)
            return response.status_code, response.json().get("code")

        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(start, range(40)))
        assert answers.count((202, None)) == 5, answers
        assert answers.count((429, "concurrency_limit")) == 35, answers
        assert Run.objects.filter(api_key=alice.key).count() == active_slots(alice) == 5
        for run_id in Run.objects.values_list("pk", flat=True):
            assert http.post(f"/api/v1/runs/{run_id}/cancel").status_code in (200, 202)
    wait_until(lambda: active_slots(alice) == 0, 20, message="every slot given back")


def test_run_larger_than_token_budget(alice, make_chain):
    chain = make_chain("demo")
    reservation = token_reservation(chain=chain, run_input=BODY["input"])
    set_limits(alice, tokens_per_minute=reservation - 1)
    response = create(alice)
    # No retry can make it fit: not a 429, and nothing invites one.
    problem = assert_problem(response, 422, "run_too_large")
    assert "never" in problem["detail"] and str(reservation) in problem["detail"]
    assert not response.has_header("Retry-After")
    assert not Run.objects.exists()
    page = alice.client.get(problem["type"])
    assert page.status_code == 200 and b"Run too large" in page.content


def tokens_left(response) -> int:
    """What a token_budget_exceeded answer says is left: "...; N of Q are left ..."."""
    match = re.search(r"; (\d+) of (\d+) are left", response.json()["detail"])
    assert match, response.json()
    return int(match.group(1))


def test_token_budget_reserve_and_settle(alice, make_chain, django_capture_on_commit_callbacks):
    chain = make_chain("demo", models=[fake(tokens=5)])
    reservation = token_reservation(chain=chain, run_input=BODY["input"])
    set_limits(alice, tokens_per_minute=reservation * 2)
    first = create(alice).json()["run_id"]
    create(alice)
    response = create(alice)
    assert_problem(response, 429, "token_budget_exceeded")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert tokens_left(response) == 0
    # The first run ends using far fewer tokens than it reserved: the rest is refunded.
    with django_capture_on_commit_callbacks(execute=True):
        run_execute(run_id=first)
    run = Run.objects.get(pk=first)
    used = run.input_tokens + run.output_tokens
    assert 0 < used < reservation
    response = create(alice)  # the refund is smaller than a whole reservation
    assert response.status_code == 429
    assert tokens_left(response) == reservation - used


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_worker_settles_tokens_for_every_web_process(live_server_url, worker, alice, make_chain):
    """The reservation is made by the web process and settled by the worker: both see it."""
    import httpx

    from tests.conftest import wait_until

    chain = make_chain("demo", models=[fake(tokens=5)])
    reservation = token_reservation(chain=chain, run_input=BODY["input"])
    set_limits(alice, tokens_per_minute=reservation + 1)
    with httpx.Client(
        base_url=live_server_url, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as http:
        run_id = http.post("/api/v1/chains/demo/runs", json=BODY).json()["run_id"]
        wait_until(lambda: Run.objects.get(pk=run_id).status == "completed", 30)
        run = Run.objects.get(pk=run_id)
        used = run.input_tokens + run.output_tokens

        def left():
            response = http.post("/api/v1/chains/demo/runs", json=BODY)
            assert response.status_code == 429
            return int(re.search(r"; (\d+) of", response.json()["detail"]).group(1))

        wait_until(lambda: left() == 1 + reservation - used, 10, 0.2, "the settlement")


def test_queue_full(alice, make_chain, settings):
    settings.QUEUE_MAX = 1
    settings.QUEUE_DEPTH_CACHE_S = 0
    make_chain("demo")
    assert create(alice).status_code == 202
    response = create(alice)
    assert_problem(response, 503, "queue_full")
    assert response["Retry-After"] == str(settings.QUEUE_RETRY_AFTER_S)
    assert Run.objects.count() == 1


def test_limits_do_not_apply_to_infrastructure(db, settings):
    from django.test import Client

    client = Client()
    assert "RateLimit" not in client.get("/healthz")


@pytest.mark.parametrize("limit", ["requests_per_minute", "runs_per_minute"])
def test_limits_are_per_key_not_per_owner(alice, make_chain, limit):
    """Two keys of one owner have their own counters."""
    from agentsvc.services import api_key_create
    from tests.conftest import Api

    make_chain("demo")
    _, raw = api_key_create(owner_name="alice", name="second")
    other = Api(raw)
    set_limits(alice, **{limit: 1})
    create(alice)
    assert create(alice).status_code == 429
    assert create(other).status_code == 202


def test_cache_backends_of_requests_share_one_redis_pool(settings):
    """Every request context under ASGI gets its own cache backend; they share the process's
    Redis client and pool, so requests open no connections of their own."""
    from django.core.cache import caches

    from agentsvc.cache import RedisCache

    location = settings.CACHES["default"]["LOCATION"]
    first = RedisCache(location, {})
    second = RedisCache(location, {})
    assert first._cache.get_client(write=True) is second._cache.get_client(write=True)
    assert caches["default"]._cache.get_client(write=True) is first._cache.get_client(write=True)
