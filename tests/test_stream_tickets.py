"""Stream tickets (docs/api.md section 1): what a browser uses instead of a key in the URL.

`POST /api/v1/stream-tickets` mints one; `?ticket=` then opens that run's SSE stream and
WebSocket (or, for a feed ticket, the status feed) until it expires, reconnects included, and
nothing else. Keys in URLs are refused everywhere."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import datetime

import httpx
import pytest
from websockets.sync.client import connect

from agentsvc.services import api_key_revoke
from runs.models import Run
from runs.services import run_create
from runs.tickets import stream_ticket_create
from tests.conftest import fake, process_env, start_web
from tests.sse_client import events
from tests.test_isolation import _feed_started
from tests.test_ws import frames_until_close
from tests.webhook_support import finished_run

TICKETS = "/api/v1/stream-tickets"
SSE = {"Accept": "text/event-stream"}
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_minting(alice, bob, make_chain, settings):
    chain = make_chain("demo")
    mine = run_create(api_key=alice.key, chain=chain, run_input={"topic": "t"}, metadata={})
    theirs = run_create(api_key=bob.key, chain=chain, run_input={"topic": "t"}, metadata={})
    for body in ({}, {"run_id": str(mine.id)}):
        response = alice.post(TICKETS, body)
        assert response.status_code == 201, response.content
        answer = response.json()
        assert set(answer) == {"ticket", "expires_at"} and RFC3339_MS.match(answer["expires_at"])
        expires = datetime.fromisoformat(answer["expires_at"]).timestamp()
        assert abs(expires - (time.time() + settings.STREAM_TICKET_TTL_S)) < 5
        assert alice.raw_key not in answer["ticket"]
    # Another owner's run is a 404 exactly like a missing one.
    foreign = alice.post(TICKETS, {"run_id": str(theirs.id)})
    missing = alice.post(TICKETS, {"run_id": "00000000-0000-4000-8000-000000000000"})
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["detail"] == missing.json()["detail"]
    for body in ({"run_id": 1}, {"run_id": "x"}, {"run_id": None}, {"run": str(mine.id)}):
        assert alice.post(TICKETS, body).status_code == 400, body
    assert alice.client.post(TICKETS, "{}", content_type="application/json").status_code == 401
    # Idempotency-Key, as on every POST: the same answer again.
    key = {"Idempotency-Key": "ticket-1"}
    first = alice.post(TICKETS, {"run_id": str(mine.id)}, headers=key)
    again = alice.post(TICKETS, {"run_id": str(mine.id)}, headers=key)
    assert again["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert alice.post(TICKETS, {}, headers=key).status_code == 422


def _ticket(http: httpx.Client, api, run: Run | None = None) -> str:
    body = {"run_id": str(run.id)} if run is not None else {}
    response = http.post(TICKETS, json=body, headers={"Authorization": f"Bearer {api.raw_key}"})
    assert response.status_code == 201, response.text
    return response.json()["ticket"]


def _sse(http: httpx.Client, run: Run, query: str, **headers) -> tuple[int, list]:
    with http.stream(
        "GET", f"/api/v1/runs/{run.id}/events?{query}", headers={**SSE, **headers}
    ) as response:
        if response.status_code != 200:
            response.read()
            assert response.headers["Content-Type"] == "application/problem+json"
            return response.status_code, []
        return 200, [e.event for e in events(response.iter_lines())]


def _ws(base: str, path: str) -> tuple[list[dict], int]:
    with connect(f"{base.replace('http://', 'ws://')}{path}") as sock:
        return frames_until_close(sock)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_ticket_opens_its_stream_and_nothing_else(live_server_url, alice, bob, make_chain):
    run = finished_run(alice, make_chain)
    other = run_create(api_key=alice.key, chain=run.chain, run_input={"topic": "t"}, metadata={})
    all_events = [e.type for e in run.events.order_by("seq")]
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        ticket = _ticket(http, alice, run)
        # Its SSE stream and WebSocket, any number of times, resuming where they were.
        assert _sse(http, run, f"ticket={ticket}") == (200, all_events)
        assert _sse(http, run, f"ticket={ticket}&after=2") == (200, all_events[2:])
        assert _sse(http, run, f"ticket={ticket}", **{"Last-Event-ID": "3"}) == (
            200,
            all_events[3:],
        )
        frames, code = _ws(live_server_url, f"/ws/v1/runs/{run.id}?ticket={ticket}")
        assert code == 1000 and [f["event"] for f in frames] == all_events
        frames, code = _ws(live_server_url, f"/ws/v1/runs/{run.id}?after=4&ticket={ticket}")
        assert code == 1000 and [f["event"] for f in frames] == all_events[4:]

        # Nothing else: another run, the feed, the JSON page, any REST endpoint.
        assert _sse(http, other, f"ticket={ticket}")[0] == 401
        assert _ws(live_server_url, f"/ws/v1/runs/{other.id}?ticket={ticket}") == ([], 4401)
        assert _ws(live_server_url, f"/ws/v1/runs?ticket={ticket}") == ([], 4401)
        for path in (f"/api/v1/runs/{run.id}/events", f"/api/v1/runs/{run.id}", "/api/v1/runs"):
            response = http.get(path, params={"ticket": ticket})
            assert response.status_code == 401, path
        response = http.post(f"/api/v1/runs/{other.id}/cancel", params={"ticket": ticket})
        assert response.status_code == 401

        # A feed ticket opens the feed of its key's owner, and no run's stream.
        feed = _ticket(http, alice)
        assert _sse(http, run, f"ticket={feed}")[0] == 401
        assert _ws(live_server_url, f"/ws/v1/runs/{run.id}?ticket={feed}") == ([], 4401)
        ws = live_server_url.replace("http://", "ws://")
        with connect(f"{ws}/ws/v1/runs?ticket={feed}") as sock:
            _feed_started(sock, alice, run.chain)

        # Forged, expired, or for a run of someone else's: refused.
        forged = ticket[:-3] + ("AAA" if not ticket.endswith("AAA") else "BBB")
        expired, _ = stream_ticket_create(api_key=alice.key, run=run, now=time.time() - 3600)
        bobs = _ticket(http, bob)
        for bad in (forged, expired, bobs, "", "x" * 600):
            assert _sse(http, run, f"ticket={bad}")[0] == 401
            assert _ws(live_server_url, f"/ws/v1/runs/{run.id}?ticket={bad}") == ([], 4401)

        # A revoked key's tickets stop working at once.
        api_key_revoke(key=alice.key)
        assert _sse(http, run, f"ticket={ticket}")[0] == 401
        assert _ws(live_server_url, f"/ws/v1/runs/{run.id}?ticket={ticket}") == ([], 4401)
        assert _ws(live_server_url, f"/ws/v1/runs?ticket={feed}") == ([], 4401)
    Run.objects.filter(pk=other.pk).update(status="cancelled")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_keys_in_urls_are_refused_everywhere(live_server_url, alice, make_chain):
    run = finished_run(alice, make_chain)
    key = {"Authorization": f"Bearer {alice.raw_key}"}
    query = {"api_key": alice.raw_key}
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        for method, path, headers in [
            ("GET", "/api/v1/runs", {}),
            ("GET", "/api/v1/runs", key),  # even beside a good header
            ("GET", f"/api/v1/runs/{run.id}/events", {}),
            ("GET", f"/api/v1/runs/{run.id}/events", SSE),
            ("GET", f"/api/v1/runs/{run.id}/events", {**SSE, **key}),
            ("POST", "/api/v1/chains/demo/runs", key),
            ("POST", "/api/v1/chains/demo/stream", key),
            ("POST", TICKETS, key),
        ]:
            response = http.request(method, path, params=query, headers=headers, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "authentication_failed"
            assert alice.raw_key not in response.text
    for path in (f"/ws/v1/runs/{run.id}?api_key={alice.raw_key}", "/ws/v1/runs?api_key=x"):
        assert _ws(live_server_url, path) == ([], 4401)
    assert Run.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_ticket_streams_count_against_the_keys_stream_limit(tmp_path, alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=3)])
    # Never enqueued: it stays queued, so its streams stay open.
    run = Run.objects.create(owner=alice.key.owner, api_key=alice.key, chain=chain, input={})
    web, url = start_web(process_env(STREAMS_PER_KEY="1"), tmp_path / "web.log")
    try:
        with httpx.Client(base_url=url, timeout=30) as http, contextlib.ExitStack() as stack:
            ticket = _ticket(http, alice, run)
            held = stack.enter_context(
                http.stream("GET", f"/api/v1/runs/{run.id}/events?ticket={ticket}", headers=SSE)
            )
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: dropping it would close the stream
            next(lines)  # the retry line: the stream is open
            over = http.get(f"/api/v1/runs/{run.id}/events?ticket={ticket}", headers=SSE)
            assert over.status_code == 429 and over.json()["code"] == "concurrency_limit"
            frames = _ws(url, f"/ws/v1/runs/{run.id}?ticket={ticket}")
            assert frames == ([], 4429)
    finally:
        web.stop()
        Run.objects.filter(pk=run.pk).update(status="cancelled")
