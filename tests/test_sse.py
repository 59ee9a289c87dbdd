"""SSE over real sockets: a daphne process serving, a qcluster process executing, Redis waking."""

from __future__ import annotations

import httpx
import pytest

from runs.models import Run
from tests.conftest import fake, wait_until
from tests.sse_client import events, parse_lines

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SSE = {"Accept": "text/event-stream"}
TERMINAL = {"run.completed", "run.failed", "run.cancelled", "run.timed_out"}


@pytest.fixture
def http(live_server_url, worker, alice):
    with httpx.Client(
        base_url=live_server_url, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as client:
        yield client
    settle()


def settle() -> None:
    """Let runs still going end before the database is flushed (a worker mid-write and the
    flush's TRUNCATE can deadlock)."""
    wait_until(
        lambda: not Run.objects.filter(status__in=["queued", "running"]).exists(),
        60,
        message="runs to end",
    )


def start(http, chain: str = "demo") -> str:
    response = http.post(f"/api/v1/chains/{chain}/runs", json={"input": {"topic": "tides"}})
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


def read_all(http, run_id: str, headers: dict | None = None, params: dict | None = None):
    with http.stream(
        "GET", f"/api/v1/runs/{run_id}/events", headers={**SSE, **(headers or {})}, params=params
    ) as response:
        assert response.status_code == 200, response.read()
        return list(events(response.iter_lines())), response.headers


def test_sse_streams_the_whole_run_in_order_and_ends(http, make_chain):
    """A reader on the web process gets every event the worker process writes, 1..n, in order."""
    make_chain("demo", models=[fake(tokens=12, latency_ms=10), fake(tokens=8)])
    run_id = start(http)
    frames, headers = read_all(http, run_id)
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    seqs = [f.id for f in frames]
    assert seqs == list(range(1, len(frames) + 1))
    assert frames[0].event == "run.queued" and frames[-1].event == "run.completed"
    assert [f.event for f in frames].count("agent.started") == 2
    assert all(f.data["seq"] == f.id and f.data["run_id"] == run_id for f in frames)
    for index, count in ((0, 12), (1, 8)):
        chunks = [
            f.data["chunk"]
            for f in frames
            if f.event == "agent.output" and f.data["index"] == index
        ]
        assert len("".join(chunks).split()) == count
    assert frames[-1].data["output"] == Run.objects.get(pk=run_id).output


def test_first_bytes_arrive_before_any_event(http, make_chain):
    make_chain("demo", models=[fake(tokens=3, latency_ms=300)])
    run_id = start(http)
    with http.stream("GET", f"/api/v1/runs/{run_id}/events", headers=SSE) as response:
        first = next(parse_lines(response.iter_lines()))
        assert first.retry is not None and first.event is None


def test_resume_after_disconnects_gives_each_event_once(http, make_chain):
    make_chain("demo", models=[fake(tokens=30, latency_ms=40)])
    run_id = start(http)
    seen: list[int] = []
    last = 0
    for _ in range(3):  # read a few events, then hang up mid-run
        with http.stream(
            "GET", f"/api/v1/runs/{run_id}/events", headers={**SSE, "Last-Event-ID": str(last)}
        ) as response:
            for frame in events(response.iter_lines()):
                seen.append(frame.id)
                last = frame.id
                if len(seen) % 4 == 0:
                    break
    assert Run.objects.get(pk=run_id).status == "running"  # really in the middle
    frames, _ = read_all(http, run_id, params={"after": str(last)})
    seen += [f.id for f in frames]
    assert seen == list(range(1, len(seen) + 1))
    assert frames[-1].event == "run.completed"


def test_after_and_last_event_id_replay_a_finished_run(http, make_chain):
    make_chain("demo", models=[fake(tokens=5)])
    run_id = start(http)
    full, _ = read_all(http, run_id)
    n = len(full)
    after3, _ = read_all(http, run_id, params={"after": "3"})
    assert [f.id for f in after3] == list(range(4, n + 1))
    header, _ = read_all(http, run_id, headers={"Last-Event-ID": str(n - 1)})
    assert [f.id for f in header] == [n]
    # Last-Event-ID (the browser's reconnect) wins over the URL's ?after=.
    both, _ = read_all(http, run_id, headers={"Last-Event-ID": "2"}, params={"after": "0"})
    assert both[0].id == 3


def test_reconnecting_to_an_ended_stream_answers_204(http, make_chain):
    """An EventSource (a browser, requests-sse) reconnects whenever a stream ends, with the last
    id it saw: at the end of a finished run that is a 204, which stops it, not a 200 that ends
    at once and is reopened every `retry` ms for ever."""
    make_chain("demo", models=[fake(tokens=3), fake(tokens=3)])
    run_id = start(http)
    full, _ = read_all(http, run_id)
    url, last = f"/api/v1/runs/{run_id}/events", full[-1].id
    for cursor in ({"headers": {**SSE, "Last-Event-ID": str(last)}}, {"params": {"after": last}}):
        done = http.get(url, **{"headers": SSE, **cursor})
        assert done.status_code == 204 and done.content == b"", done.text
        assert "content-type" not in done.headers
        assert done.headers["RateLimit"]  # still a request of the key
    # With a filter, a reconnect sends the last event shown: nothing of the filter after it
    # is the end too, though the run's terminal event comes later.
    first, second = [f.id for f in full if f.event == "agent.started"]
    filtered = {"events": "agent.started"}
    done = http.get(url, headers={**SSE, "Last-Event-ID": str(second)}, params=filtered)
    assert done.status_code == 204
    rest, _ = read_all(http, run_id, {"Last-Event-ID": str(first)}, filtered)
    assert [f.id for f in rest] == [second]


def test_stream_endpoint_creates_and_streams(http, make_chain):
    make_chain("demo", models=[fake(tokens=6)])
    with http.stream(
        "POST", "/api/v1/chains/demo/stream", json={"input": {"topic": "tides"}}
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        frames = list(events(response.iter_lines()))
    run_id = frames[0].data["run_id"]
    assert response.headers["X-Run-Id"] == run_id
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    assert frames[0].event == "run.queued" and frames[-1].event == "run.completed"
    assert Run.objects.get(pk=run_id).status == "completed"


def test_stream_endpoint_validates_like_create(http, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    bad = [
        ({"input": {}}, 400, "validation_error"),
        ({"input": {"topic": "x"}, "bogus": 1}, 400, "validation_error"),
        ({"input": {"topic": "x"}, "cancel_on_disconnect": "maybe"}, 400, "validation_error"),
        ({"input": {"topic": "x"}, "version": 99}, 404, "not_found"),
        ([1, 2], 400, "validation_error"),
    ]
    for body, status, code in bad:
        response = http.post("/api/v1/chains/demo/stream", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == code
    response = http.post(
        "/api/v1/chains/demo/stream", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["code"] == "validation_error"
    response = http.post("/api/v1/chains/nope/stream", json={"input": {"topic": "x"}})
    assert response.status_code == 404
    assert Run.objects.count() == 0


def test_stream_errors_are_problems_before_the_stream(http, make_chain, bob):
    make_chain("demo", models=[fake(tokens=3)])
    run_id = start(http)
    url = f"/api/v1/runs/{run_id}/events"
    cases = [
        ({**SSE, "Authorization": ""}, {}, 401, "authentication_failed"),
        ({**SSE, "Authorization": "Bearer ak_" + "x" * 40}, {}, 401, "authentication_failed"),
        ({**SSE, "Authorization": f"Bearer {bob.raw_key}"}, {}, 404, "not_found"),
        (SSE, {"after": "abc"}, 400, "validation_error"),
        (SSE, {"after": "-1"}, 400, "validation_error"),
        ({**SSE, "Last-Event-ID": "x"}, {}, 400, "validation_error"),
        (SSE, {"limit": "5", "after": "1"}, 400, "validation_error"),
    ]
    for headers, params, status, code in cases:
        response = http.get(url, headers=headers, params=params)
        assert response.status_code == status, (headers, params, response.text)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == code
    assert "WWW-Authenticate" in http.get(url, headers={**SSE, "Authorization": ""}).headers
    # Another owner's run through the create-and-stream path: not even its existence leaks.
    response = httpx.post(
        f"{http.base_url}/api/v1/chains/demo/stream",
        json={"input": {"topic": "x"}},
        headers={"Authorization": "Bearer nope"},
    )
    assert response.status_code == 401
    # The JSON page still answers on the same URL without the SSE Accept header, and to any
    # Accept that admits JSON; one that admits neither is a 406 (on the fast lane's route too).
    for accept in (None, "*/*", "application/*", "application/json; charset=utf-8"):
        page = http.get(url, headers={"Accept": accept} if accept else {})
        assert page.status_code == 200 and page.json()["results"][0]["seq"] == 1, accept
    for accept in ("application/xml", "text/html", "application/json;q=0"):
        refused = http.get(url, headers={"Accept": accept})
        assert refused.status_code == 406, (accept, refused.text)
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.json()["code"] == "not_acceptable"


def _read_some_then_hang_up(http, body: dict, n: int) -> str:
    with http.stream("POST", "/api/v1/chains/demo/stream", json=body) as response:
        assert response.status_code == 200
        for frame in events(response.iter_lines()):
            if frame.id >= n:
                return frame.data["run_id"]
    raise AssertionError("the run ended before we hung up")


def test_disconnect_does_not_cancel_the_run(http, make_chain):
    make_chain("demo", models=[fake(tokens=20, latency_ms=40)])
    run_id = _read_some_then_hang_up(http, {"input": {"topic": "x"}}, 4)
    run = wait_until(
        lambda: (r := Run.objects.get(pk=run_id)).is_terminal and r, 30, message="run end"
    )
    assert run.status == "completed"


def test_cancel_on_disconnect_cancels_the_run(http, make_chain):
    make_chain("demo", models=[fake(tokens=40, latency_ms=50)])
    run_id = _read_some_then_hang_up(
        http, {"input": {"topic": "x"}, "cancel_on_disconnect": True}, 4
    )
    run = wait_until(
        lambda: (r := Run.objects.get(pk=run_id)).is_terminal and r, 30, message="run end"
    )
    assert run.status == "cancelled"
    assert run.cancel_reason == "disconnect"
    last = run.events.order_by("-seq").first()
    assert last.type == "run.cancelled" and last.data["reason"] == "disconnect"


def test_stream_with_the_same_idempotency_key_replays_the_run(http, make_chain):
    make_chain("demo", models=[fake(tokens=6)])
    headers = {"Idempotency-Key": "stream-1"}
    body = {"input": {"topic": "tides"}}

    def stream():
        with http.stream(
            "POST", "/api/v1/chains/demo/stream", json=body, headers=headers
        ) as response:
            assert response.status_code == 200
            return list(events(response.iter_lines())), response.headers

    first, first_headers = stream()
    second, second_headers = stream()
    assert "Idempotent-Replayed" not in first_headers
    assert second_headers["Idempotent-Replayed"] == "true"
    assert second_headers["X-Run-Id"] == first_headers["X-Run-Id"]
    assert [(f.id, f.event) for f in second] == [(f.id, f.event) for f in first]
    assert Run.objects.count() == 1
    other = http.post(
        "/api/v1/chains/demo/stream", json={"input": {"topic": "other"}}, headers=headers
    )
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"


def test_streams_count_against_the_request_limit(http, make_chain, alice):
    from agentsvc.models import ApiKey

    make_chain("demo", models=[fake(tokens=3)])
    run_id = start(http)
    ApiKey.objects.filter(pk=alice.key.pk).update(requests_per_minute=2)
    _, headers = read_all(http, run_id)
    assert "requests" in headers["RateLimit-Policy"]
    http.get(f"/api/v1/runs/{run_id}")
    limited = http.get(f"/api/v1/runs/{run_id}/events", headers=SSE)
    assert limited.status_code == 429
    assert limited.json()["violated-policies"] == ["requests"]
    refused = http.post("/api/v1/chains/demo/stream", json={"input": {"topic": "x"}})
    assert refused.status_code == 429


def test_stream_refuses_bodies_the_database_cannot_hold(http, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    response = http.post(
        "/api/v1/chains/demo/stream",
        content=b'{"input": {"topic": "a\\u0000b"}}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert not Run.objects.exists()
