"""`?events=` on the events page, SSE (GET and POST /stream) and the WebSocket, over a live
server and a real executor: filtered streams keep each event's own seq, resume as before, and
end after the run's end even when its terminal event is filtered out."""

from __future__ import annotations

import httpx
import pytest
from websockets.sync.client import connect

from runs.models import Run, RunEvent
from tests.conftest import fake
from tests.sse_client import events as sse_events
from tests.test_sse import SSE, read_all, settle, start
from tests.test_ws import bearer, frames_until_close

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

OUTPUT_AND_END = "agent.output,run.completed"


@pytest.fixture
def http(live_server_url, worker, alice):
    with httpx.Client(
        base_url=live_server_url, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as client:
        yield client
    settle()


def _stored(run_id: str, types: set[str]) -> list[tuple[int, str]]:
    return list(
        RunEvent.objects.filter(run_id=run_id, type__in=types)
        .order_by("seq")
        .values_list("seq", "type")
    )


def test_sse_sends_only_the_named_events_with_their_own_seq(http, make_chain):
    make_chain("demo", models=[fake(tokens=6, latency_ms=30), fake(tokens=4)])
    run_id = start(http)
    frames, _ = read_all(http, run_id, params={"events": OUTPUT_AND_END})
    wanted = {"agent.output", "run.completed"}
    assert [(f.id, f.event) for f in frames] == _stored(run_id, wanted)
    assert frames[-1].event == "run.completed"
    assert "".join(f.data["chunk"] for f in frames if f.data.get("index") == 1).split() == (
        Run.objects.get(pk=run_id).output.split()
    )
    # Resuming a filtered stream: Last-Event-ID is a seq of the unfiltered log.
    middle = frames[len(frames) // 2].id
    rest, _ = read_all(
        http, run_id, headers={"Last-Event-ID": str(middle)}, params={"events": OUTPUT_AND_END}
    )
    assert [f.id for f in rest] == [f.id for f in frames if f.id > middle]


def test_sse_ends_after_the_run_even_when_its_end_is_filtered_out(http, make_chain):
    make_chain("demo", models=[fake(tokens=5, latency_ms=20)])
    run_id = start(http)
    frames, _ = read_all(http, run_id, params={"events": "agent.started"})
    assert [(f.id, f.event) for f in frames] == _stored(run_id, {"agent.started"})
    assert Run.objects.get(pk=run_id).status == "completed"  # the stream ended with the run


def test_post_stream_takes_the_filter_too(http, make_chain):
    make_chain("demo", models=[fake(tokens=4)])
    with http.stream(
        "POST",
        "/api/v1/chains/demo/stream",
        params={"events": "run.queued,run.completed"},
        json={"input": {"topic": "tides"}},
        headers=SSE,
    ) as response:
        assert response.status_code == 200, response.read()
        frames = list(sse_events(response.iter_lines()))
    assert [f.event for f in frames] == ["run.queued", "run.completed"]
    assert frames[0].id == 1 and frames[1].id == Run.objects.get().last_seq


def test_json_page_filters_and_pages_past_what_it_left_out(http, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    run_id = start(http)
    read_all(http, run_id)  # until the end
    page = http.get(f"/api/v1/runs/{run_id}/events", params={"events": "agent.completed"}).json()
    assert [(e["seq"], e["event"]) for e in page["results"]] == _stored(run_id, {"agent.completed"})
    # Nothing of that type is left: the next page starts after the run's last event.
    assert page["next_after"] == Run.objects.get(pk=run_id).last_seq
    small = http.get(
        f"/api/v1/runs/{run_id}/events", params={"events": "run.queued,run.started", "limit": 1}
    ).json()
    assert [e["event"] for e in small["results"]] == ["run.queued"]
    assert small["next_after"] == 1


@pytest.mark.parametrize("value", ["agent.outptu", "", "run.completed,,agent.output", "x" * 500])
def test_an_unknown_event_name_is_a_400_everywhere(http, make_chain, value):
    make_chain("demo", models=[fake(tokens=2)])
    run_id = start(http)
    for response in (
        http.get(f"/api/v1/runs/{run_id}/events", params={"events": value}),
        http.get(f"/api/v1/runs/{run_id}/events", params={"events": value}, headers=SSE),
        http.post(
            "/api/v1/chains/demo/stream",
            params={"events": value},
            json={"input": {"topic": "t"}},
            headers=SSE,
        ),
    ):
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "validation_error"
        assert [e["field"] for e in problem["errors"]] == ["events"]
        assert len(problem["errors"][0]["message"]) < 400
    assert Run.objects.count() == 1  # the refused stream started no run


def test_websocket_filters_and_closes_4400_on_an_unknown_name(
    live_server_url, worker, alice, make_chain
):
    make_chain("demo", models=[fake(tokens=5, latency_ms=20)])
    ws = live_server_url.replace("http://", "ws://")
    try:
        run_id = start(httpx.Client(base_url=live_server_url, headers=bearer(alice)))
        url = f"{ws}/ws/v1/runs/{run_id}"
        with connect(f"{url}?events=agent.output", additional_headers=bearer(alice)) as sock:
            frames, code = frames_until_close(sock)
        assert code == 1000  # closed after the run ended, though run.completed was not sent
        assert [(f["seq"], f["event"]) for f in frames] == _stored(run_id, {"agent.output"})
        with connect(
            f"{url}?events=run.completed&after=2", additional_headers=bearer(alice)
        ) as sock:
            frames, code = frames_until_close(sock)
        assert code == 1000 and [f["event"] for f in frames] == ["run.completed"]
        with connect(f"{url}?events=nope", additional_headers=bearer(alice)) as sock:
            assert frames_until_close(sock) == ([], 4400)
    finally:
        settle()
