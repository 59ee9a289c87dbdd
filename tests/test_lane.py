"""The fast lane (agentsvc/lane.py): run creates, status polls and events pages answered at the
ASGI layer.

Each answer is checked against the DRF view's answer to the same call (Django's test client),
the lane's use is read from the live server's own counter (agentsvc_lane_calls_total), and the
limits it enforces are driven with real parallel requests."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db import connections

from agentsvc import lane
from agentsvc.models import ApiKey, TokenWindow
from runs.models import Run, RunEvent
from runs.services import event_append
from tests.conftest import process_env, start_web
from tests.webhook_support import SECRET

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CREATE = "/api/v1/chains/demo/runs"
CREATE_ROUTE = "api/v1/chains/<slug:name>/runs"
GET_ROUTE = "api/v1/runs/<uuid:run_id>"
EVENTS_ROUTE = "api/v1/runs/<uuid:run_id>/events"
# Answer headers both paths send (daphne's Server and the request id aside).
HEADERS = (
    "content-type",
    "allow",
    "retry-after",
    "x-content-type-options",
    "referrer-policy",
    "cross-origin-opener-policy",
    "x-frame-options",
    "ratelimit-policy",
    "www-authenticate",
)
VARYING = ("run_id", "created_at", "poll_url", "events_url", "ws_url", "instance")


def lane_calls(http: httpx.Client, route: str, outcome: str) -> float:
    text = http.get("/metrics").text
    m = re.search(
        rf'^agentsvc_lane_calls_total\{{outcome="{outcome}",route="{re.escape(route)}"\}} (\S+)$',
        text,
        re.M,
    )
    return float(m.group(1)) if m else 0.0


def lane_starts(http: httpx.Client, statement: str) -> float:
    text = http.get("/metrics").text
    pattern = rf'^agentsvc_lane_run_starts_total\{{statement="{statement}"\}} (\S+)$'
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def same(wire: httpx.Response, django, *, varying=VARYING) -> None:
    """The lane's answer and the DRF view's: status, headers, body (ids and times aside)."""
    assert wire.status_code == django.status_code, (wire.text, django.content)
    for name in HEADERS:
        assert (name in wire.headers) == django.has_header(name), name
        if name != "retry-after" and name in wire.headers:
            assert wire.headers[name] == django[name], name
    a, b = wire.json(), django.json()
    for body in (a, b):
        for name in varying:
            body.pop(name, None)
    assert a == b


@pytest.fixture
def http(live_server_url, alice):
    with httpx.Client(
        base_url=live_server_url,
        headers={"Authorization": f"Bearer {alice.raw_key}"},
        timeout=30,
    ) as client:
        yield client


def test_create_and_poll_answer_as_the_views_do(http, alice, bob, make_chain):
    make_chain("demo", schema={"type": "object", "required": ["topic"]})
    answered = lane_calls(http, CREATE_ROUTE, "answered")
    body = {"input": {"topic": "x"}, "metadata": {"team": "a"}}

    wire = http.post(CREATE, json=body)
    same(wire, alice.post(CREATE, body))
    run = Run.objects.get(pk=wire.json()["run_id"])
    assert wire.headers["location"] == f"/api/v1/runs/{run.id}"
    assert run.metadata == {"team": "a"} and run.input == {"topic": "x"}
    assert list(RunEvent.objects.filter(run=run).values_list("seq", "type")) == [(1, "run.queued")]
    pinned = {"input": {"topic": "x"}, "version": 1}
    same(http.post(CREATE, json=pinned), alice.post(CREATE, pinned))
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 4
    assert "ratelimit" in wire.headers and wire.headers["x-request-id"]

    # Refusals after the request is counted: the lane answers them, as the view does.
    for bad in (
        {"input": {}},  # not the chain's input schema
        {"input": {"topic": "x"}, "surprise": 1},  # unknown field
        {"input": {"topic": "x"}, "version": 9},  # no such version
        {"input": {"topic": "x"}, "metadata": {"k": {"nested": 1}}},  # not a flat value
        {"input": {"topic": "x"}, "webhook": {"url": "http://10.0.0.1/hook"}},  # SSRF guard
    ):
        same(http.post(CREATE, json=bad), alice.post(CREATE, bad))
    same(
        http.post("/api/v1/chains/nope/runs", json=body),
        alice.post("/api/v1/chains/nope/runs", body),
    )
    assert lane_calls(http, CREATE_ROUTE, "answered") == answered + 8

    polled = lane_calls(http, GET_ROUTE, "answered")
    path = f"/api/v1/runs/{run.id}"
    wire = http.get(path)
    same(wire, alice.get(path), varying=("created_at", "instance"))
    assert wire.json()["run_id"] == str(run.id) and wire.headers["retry-after"] in ("2", "5")
    # Another owner's run does not exist for bob, on the lane as in the view.
    other = http.get(path, headers={"Authorization": f"Bearer {bob.raw_key}"})
    same(other, bob.get(path))
    assert other.status_code == 404
    unknown = f"/api/v1/runs/{uuid.uuid4()}"
    same(http.get(unknown), alice.get(unknown))
    assert lane_calls(http, GET_ROUTE, "answered") == polled + 3


def test_calls_off_the_plain_path_are_answered_by_django(http, alice, make_chain):
    make_chain("demo", schema={"type": "object"})
    declined = lane_calls(http, CREATE_ROUTE, "declined")
    body = {"input": {}}

    first = http.post(CREATE, json=body, headers={"Idempotency-Key": "k1"})
    again = http.post(CREATE, json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["run_id"] == first.json()["run_id"]
    assert Run.objects.count() == 1

    unknown_key = http.post(CREATE, json=body, headers={"Authorization": "Bearer ak_" + "x" * 40})
    assert unknown_key.status_code == 401
    assert unknown_key.headers["www-authenticate"] == 'Bearer realm="api"'
    assert (
        http.post(CREATE, content=b"{oops", headers={"Content-Type": "application/json"}).json()[
            "errors"
        ][0]["field"]
        == "body"
    )
    assert http.post(f"{CREATE}?x=1", json=body).status_code == 202  # the view ignores queries
    assert (
        http.post(CREATE, content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    )
    # Declined: both idempotent calls, the unknown key, the broken JSON, the text body (a call
    # with a query string is not a lane call at all).
    assert lane_calls(http, CREATE_ROUTE, "declined") == declined + 5
    assert Run.objects.count() == 2

    # A key revoked a moment ago is refused at once.
    ApiKey.objects.filter(pk=alice.key.pk).update(revoked_at="2020-01-01T00:00:00Z")
    assert http.post(CREATE, json=body).status_code == 401
    assert http.get(f"/api/v1/runs/{first.json()['run_id']}").status_code == 401


def test_active_run_limit_holds_under_parallel_creates(http, alice, make_chain):
    """16 creates at once against 3 free slots: exactly 3 runs, and the refused ones reserve
    no tokens (the one statement's partial outcome is refunded)."""
    make_chain("demo", schema={"type": "object"})
    ApiKey.objects.filter(pk=alice.key.pk).update(max_active_runs=3)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: http.post(CREATE, json={"input": {}}), range(16)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [202] * 3 + [429] * 13
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["code"] == "concurrency_limit" and refused.headers["retry-after"]
    assert Run.objects.count() == 3
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 3
    reserved = sum(Run.objects.values_list("tokens_reserved", flat=True))
    assert sum(TokenWindow.objects.values_list("used", flat=True)) == reserved


def test_parallel_starts_of_one_key_go_in_groups(http, alice, make_chain):
    """Creates of one key that arrive while its start statement is out go together in one
    statement: every run is written once with its first event, its slot and its tokens."""
    make_chain("demo", schema={"type": "object"})
    ApiKey.objects.filter(pk=alice.key.pk).update(max_active_runs=100)
    grouped, alone = lane_starts(http, "grouped"), lane_starts(http, "alone")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: http.post(CREATE, json={"input": {"n": i}}), range(32)))
    assert [a.status_code for a in answers] == [202] * 32
    ids = {a.json()["run_id"] for a in answers}
    assert set(map(str, Run.objects.values_list("id", flat=True))) == ids
    assert sorted(r.input["n"] for r in Run.objects.all()) == list(range(32))
    assert RunEvent.objects.filter(seq=1, type="run.queued").count() == 32
    assert RunEvent.objects.count() == 32
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 32
    reserved = sum(Run.objects.values_list("tokens_reserved", flat=True))
    assert sum(TokenWindow.objects.values_list("used", flat=True)) == reserved
    grouped = lane_starts(http, "grouped") - grouped
    alone = lane_starts(http, "alone") - alone
    assert grouped + alone == 32 and grouped >= 2


def test_request_and_token_limits_on_the_lane(http, alice, make_chain):
    make_chain("demo", schema={"type": "object"})
    ApiKey.objects.filter(pk=alice.key.pk).update(requests_per_minute=3)
    assert [http.post(CREATE, json={"input": {}}).status_code for _ in range(3)] == [202] * 3
    limited = http.post(CREATE, json={"input": {}})
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert http.get(f"/api/v1/runs/{Run.objects.first().id}").status_code == 429
    assert Run.objects.count() == 3

    ApiKey.objects.filter(pk=alice.key.pk).update(requests_per_minute=None, tokens_per_minute=1)
    too_large = http.post(CREATE, json={"input": {}})
    assert too_large.status_code == 422 and too_large.json()["code"] == "run_too_large"
    assert Run.objects.count() == 3


def test_events_page_answers_as_the_view_does(http, alice, bob, make_chain):
    make_chain("demo", schema={"type": "object"})
    run_id = http.post(CREATE, json={"input": {}}).json()["run_id"]
    event_append(run_id=run_id, event="agent.started", data={"agent": "a"})
    event_append(run_id=run_id, event="agent.token", data={"text": "hé"})
    path = f"/api/v1/runs/{run_id}/events"
    answered = lane_calls(http, EVENTS_ROUTE, "answered")
    for query in ("", "?after=1&limit=1", "?events=agent.token", "?limit=0", "?after=x", "?x=1"):
        wire = http.get(path + query)
        same(wire, alice.get(path + query), varying=("instance",))
    assert http.get(path).json()["next_after"] == 3
    same(http.get(path, headers={"Authorization": f"Bearer {bob.raw_key}"}), bob.get(path))
    assert lane_calls(http, EVENTS_ROUTE, "answered") == answered + 8
    # The stream of the same URL is Django's.
    declined = lane_calls(http, EVENTS_ROUTE, "declined")
    with http.stream("GET", path, headers={"Accept": "text/event-stream"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
    assert lane_calls(http, EVENTS_ROUTE, "declined") == declined + 1


def test_creates_with_the_queue_count_expiring_on_every_call(alice, make_chain, tmp_path):
    """QUEUE_DEPTH_CACHE_S=0: every create counts the queued runs again. The lane counts on its
    own connection and hands the count to the check, which counted again with the sync ORM on
    the event loop when the count expired in between (a 500, SynchronousOnlyOperation)."""
    make_chain("demo", schema={"type": "object"})
    ApiKey.objects.filter(pk=alice.key.pk).update(max_active_runs=1000)
    env = process_env(QUEUE_DEPTH_CACHE_S="0", QUEUE_MAX="48")
    proc, url = start_web(env, tmp_path / "daphne.log")
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            with ThreadPoolExecutor(16) as pool:
                answers = list(
                    pool.map(lambda i: http.post(CREATE, json={"input": {"n": i}}), range(48))
                )
            assert [a.status_code for a in answers] == [202] * 48, {a.text for a in answers}
            # The count is the database's at each call: the 49th run does not fit.
            full = http.post(CREATE, json={"input": {}})
            assert full.status_code == 503 and full.json()["code"] == "queue_full"
            assert lane_calls(http, CREATE_ROUTE, "answered") == 49
    finally:
        proc.stop()
    assert Run.objects.count() == 48
    assert "SynchronousOnlyOperation" not in proc.output()


PUBLIC = "93.184.216.34"


class SlowDNS:
    """A resolver that answers names under .test with a public address after `delay` seconds;
    other names resolve as usual."""

    def __init__(self, monkeypatch) -> None:
        self.delay = 0.0
        self.asked: list[str] = []
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kwargs):
        if not str(host).endswith(".test"):
            return self.real(host, port, *args, **kwargs)
        self.asked.append(host)
        time.sleep(self.delay)  # the resolver's own time: what a slow DNS server costs
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, int(port or 0)))]


class LoopWatch:
    """The longest the running loop left a 5 ms timer waiting past its time: how long some
    call held the loop."""

    TICK_S = 0.005

    async def __aenter__(self) -> LoopWatch:
        self.longest = 0.0
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.TICK_S)
            self.longest = max(self.longest, loop.time() - before - self.TICK_S)

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def asgi_call(app, method: str, path: str, key: str, body: dict | None = None):
    """One HTTP request through the ASGI application, in this process: (status, JSON body)."""
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode())]
    content = b""
    if body is not None:
        content = json.dumps(body).encode()
        headers.append((b"content-type", b"application/json"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending = [{"type": "http.request", "body": content, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # the client stays until the answer

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_lane_call_never_holds_the_event_loop(alice, make_chain, monkeypatch):
    """A create naming a webhook resolves its host (the SSRF guard). With a resolver that takes
    0.3 s, the loop that serves every other call of the process must not stall: no lane call
    may hold it more than 50 ms."""
    from agentsvc.asgi import application

    make_chain("demo", schema={"type": "object"})
    ApiKey.objects.filter(pk=alice.key.pk).update(max_active_runs=100)
    dns = SlowDNS(monkeypatch)
    hooked = {"input": {}, "webhook": {"url": "https://hooks.example.test/in", "secret": SECRET}}

    async def scenario():
        try:
            # Once before watching: the lane's pool and scripts, the DRF serializers, a thread.
            status, first = await asgi_call(application, "POST", CREATE, alice.raw_key, hooked)
            assert status == 202, first
            run_id = first["run_id"]
            dns.delay = 0.3
            async with LoopWatch() as watch:
                answers = await asyncio.gather(
                    asgi_call(application, "POST", CREATE, alice.raw_key, hooked),
                    asgi_call(application, "POST", CREATE, alice.raw_key, {"input": {}}),
                    asgi_call(application, "GET", f"/api/v1/runs/{run_id}", alice.raw_key),
                    asgi_call(application, "GET", f"/api/v1/runs/{run_id}/events", alice.raw_key),
                )
            return answers, watch.longest
        finally:
            await sync_to_async(connections.close_all)()  # the lane's thread for sync steps
            loop = asyncio.get_running_loop()
            if (pool := lane._pools.pop(loop, None)) is not None:
                await pool.close()
            if (client := lane._redises.pop(loop, None)) is not None:
                await client.aclose()

    answers, longest = asyncio.run(scenario())
    assert [status for status, _ in answers] == [202, 202, 200, 200], answers
    assert Run.objects.filter(webhook_url="https://hooks.example.test/in").count() == 2
    assert dns.asked == ["hooks.example.test"] * 2
    assert longest < 0.05, f"a lane call held the event loop {longest * 1000:.0f} ms"


def test_a_burst_of_calls_holds_at_most_the_pool_of_redis_connections(alice, make_chain, tmp_path):
    """200 creates at once through a web process whose lane may hold 4 Redis connections: all
    answered, and the process never holds more than 4 (without a bound it opened one per call
    in flight, and kept them)."""
    make_chain("demo", schema={"type": "object"})
    ApiKey.objects.filter(pk=alice.key.pk).update(
        max_active_runs=1000, runs_per_minute=100_000, requests_per_minute=100_000
    )
    proc, url = start_web(process_env(REDIS_POOL_MAX="4"), tmp_path / "daphne.log")
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    try:
        db = str(client.connection_pool.connection_kwargs.get("db", 0))

        def lane_connections() -> int:  # of web processes on this Redis database
            return sum(
                1
                for c in client.client_list()
                if c.get("name") == lane.LANE_CLIENT_NAME and str(c.get("db")) == db
            )

        before = lane_connections()

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=200)
            headers = {"Authorization": f"Bearer {alice.raw_key}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as http:
                answers = await asyncio.gather(
                    *(http.post(CREATE, json={"input": {}}, timeout=60) for _ in range(200))
                )
            return [a.status_code for a in answers]

        statuses = asyncio.run(burst())
        assert statuses == [202] * 200
        assert lane_connections() - before <= 4
    finally:
        proc.stop()
        client.close()
