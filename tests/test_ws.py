"""WebSocket streams over real sockets: daphne serving, qcluster executing, Redis waking."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runs.models import Run
from tests.conftest import fake
from tests.test_sse import settle

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def ws_url(live_server_url, worker):
    yield live_server_url.replace("http://", "ws://")
    settle()


def start(live_server_url, api, chain: str = "demo") -> str:
    response = httpx.post(
        f"{live_server_url}/api/v1/chains/{chain}/runs",
        json={"input": {"topic": "tides"}},
        headers={"Authorization": f"Bearer {api.raw_key}"},
    )
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


def bearer(api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.raw_key}"}


def frames_until_close(ws) -> tuple[list[dict], int]:
    frames = []
    try:
        while True:
            frames.append(json.loads(ws.recv(timeout=30)))
    except ConnectionClosed as closed:
        return frames, closed.rcvd.code if closed.rcvd else 1006


def test_ws_replays_then_follows_and_closes_1000(ws_url, live_server_url, alice, make_chain):
    make_chain("demo", models=[fake(tokens=10, latency_ms=20)])
    run_id = start(live_server_url, alice)
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    with connect(f"{ws_url}/ws/v1/runs/{run_id}", additional_headers=headers) as ws:
        frames, code = frames_until_close(ws)
    assert code == 1000
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert set(frames[0]) == {"seq", "event", "data", "ts"}
    assert frames[0]["event"] == "run.queued" and frames[-1]["event"] == "run.completed"
    # ?after=N (what a reconnecting browser sends, with a stream ticket: test_stream_tickets.py).
    with connect(f"{ws_url}/ws/v1/runs/{run_id}?after=3", additional_headers=headers) as ws:
        again, code = frames_until_close(ws)
    assert code == 1000
    assert [f["seq"] for f in again] == list(range(4, len(frames) + 1))


def test_ws_close_codes_before_any_frame(ws_url, live_server_url, alice, bob, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    run_id = start(live_server_url, alice)
    key = {"Authorization": f"Bearer {alice.raw_key}"}
    cases = [
        (f"/ws/v1/runs/{run_id}", {}, 4401),
        (f"/ws/v1/runs/{run_id}?api_key=ak_{'x' * 40}", {}, 4401),
        (f"/ws/v1/runs/{run_id}", {"Authorization": "Bearer nope"}, 4401),
        (f"/ws/v1/runs/{run_id}", {"Authorization": f"Bearer {bob.raw_key}"}, 4404),
        (f"/ws/v1/runs/{run_id}?after=x", key, 4400),
        ("/ws/v1/runs", {}, 4401),
        # A key in the URL is refused, even a good one, even beside a good header.
        (f"/ws/v1/runs/{run_id}?api_key={alice.raw_key}", {}, 4401),
        (f"/ws/v1/runs/{run_id}?api_key={alice.raw_key}", key, 4401),
        (f"/ws/v1/runs?api_key={alice.raw_key}", {}, 4401),
        ("/ws/v1/runs?api_key=", key, 4401),
    ]
    for path, headers, expected in cases:
        with connect(f"{ws_url}{path}", additional_headers=headers) as ws:
            frames, code = frames_until_close(ws)
        assert (frames, code) == ([], expected), path


def test_ws_refuses_a_foreign_origin(ws_url, alice):
    key = {"Authorization": f"Bearer {alice.raw_key}"}
    with pytest.raises(Exception, match="403"):
        connect(f"{ws_url}/ws/v1/runs", origin="https://evil.example", additional_headers=key)
    with connect(f"{ws_url}/ws/v1/runs", origin="http://localhost", additional_headers=key) as ws:
        ws.send("hello")  # accepted: the client only listens, extra frames are ignored


def test_status_feed_shows_own_runs_only(ws_url, live_server_url, alice, bob, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    with (
        connect(f"{ws_url}/ws/v1/runs", additional_headers=bearer(alice)) as alice_ws,
        connect(f"{ws_url}/ws/v1/runs", additional_headers=bearer(bob)) as bob_ws,
    ):
        bob_run = start(live_server_url, bob)
        alice_run = start(live_server_url, alice)
        seen = []
        while not seen or seen[-1]["data"]["status"] != "completed":
            frame = json.loads(alice_ws.recv(timeout=30))
            assert frame["event"] == "run.status"
            seen.append(frame)
        assert {f["data"]["run_id"] for f in seen} == {alice_run}
        assert [f["data"]["status"] for f in seen][:2] == ["queued", "running"]
        assert seen[-1]["data"]["progress"]["agents_completed"] == 1
        bob_frame = json.loads(bob_ws.recv(timeout=30))
        assert bob_frame["data"]["run_id"] == bob_run


def test_staff_session_sees_every_run(ws_url, live_server_url, alice, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    staff = User.objects.create_user("ops", password="x" * 12, is_staff=True)
    client = Client()
    client.force_login(staff)
    cookie = {"Cookie": f"sessionid={client.cookies['sessionid'].value}"}
    with connect(f"{ws_url}/ws/v1/runs", additional_headers=cookie) as feed:
        run_id = start(live_server_url, alice)
        assert json.loads(feed.recv(timeout=30))["data"]["run_id"] == run_id
        with connect(f"{ws_url}/ws/v1/runs/{run_id}", additional_headers=cookie) as ws:
            frames, code = frames_until_close(ws)
        assert code == 1000 and frames[-1]["event"] == "run.completed"
    # A session without staff rights is no credential.
    User.objects.filter(pk=staff.pk).update(is_staff=False)
    with connect(f"{ws_url}/ws/v1/runs", additional_headers=cookie) as ws:
        assert frames_until_close(ws) == ([], 4401)


def test_ws_disconnect_does_not_cancel(ws_url, live_server_url, alice, make_chain):
    make_chain("demo", models=[fake(tokens=20, latency_ms=40)])
    run_id = start(live_server_url, alice)
    with connect(f"{ws_url}/ws/v1/runs/{run_id}", additional_headers=bearer(alice)) as ws:
        for _ in range(3):
            ws.recv(timeout=30)
    settle()
    assert Run.objects.get(pk=run_id).status == "completed"


def test_status_feed_keeps_an_event_that_commits_late(ws_url, alice, make_chain):
    """Event ids are taken at insert; a transaction can commit after a later id was seen."""
    from django.utils import timezone

    from runs.models import RunEvent
    from runs.services import event_append

    chain = make_chain("demo", models=[fake(tokens=3)])
    # Running already: the suite's executor must not claim them.
    late = Run.objects.create(
        owner=alice.key.owner, chain=chain, input={}, last_seq=2, status="running"
    )
    other = Run.objects.create(owner=alice.key.owner, chain=chain, input={}, status="running")
    now = timezone.now()
    hole = RunEvent.objects.create(run=late, seq=1, type="x", created_at=now, data={})
    RunEvent.objects.create(run=late, seq=2, type="agent.output", created_at=now, data={})
    hole_pk = hole.pk
    hole.delete()
    with connect(f"{ws_url}/ws/v1/runs", additional_headers=bearer(alice)) as feed:
        time.sleep(0.5)  # the feed has started after the newest id
        RunEvent.objects.create(
            pk=hole_pk, run=late, seq=1, type="run.started", created_at=now, data={}
        )
        event_append(run_id=other.id, event="run.cancelled", data={}, status="cancelled")
        frames = [json.loads(feed.recv(timeout=30)) for _ in range(2)]
    assert [(f["data"]["run_id"], f["data"]["status"]) for f in frames] == [
        (str(late.id), "running"),
        (str(other.id), "cancelled"),
    ]
    Run.objects.filter(pk=late.pk).update(status="cancelled")
