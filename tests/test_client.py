"""The Python client against a live daphne server and a real worker; no server part mocked."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from agentsvc_client import (
    AsyncClient,
    AuthenticationError,
    ChainFailedError,
    Client,
    ConflictError,
    NotFoundError,
    RateLimitError,
    ValidationError,
    WaitTimeout,
    WebhookVerificationError,
    verify_webhook,
)

from agentsvc.models import ApiKey
from runs.models import Run
from tests.conftest import fake, wait_until
from tests.fakes.tcp_proxy import TcpProxy
from tests.webhook_support import SECRET, hook_path

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def resumed_from(proxy: TcpProxy) -> list[int]:
    """The Last-Event-ID of each resumed stream request, in order. A drop after event n
    resumes from n or later: events read in the same chunk as n are still yielded."""
    return [
        int(re.search(r"last-event-id: (\d+)", r, re.IGNORECASE).group(1))
        for r in proxy.requests_with("last-event-id:")
    ]


def settle() -> None:
    """Let runs still going end before the database is flushed."""
    wait_until(
        lambda: not Run.objects.filter(status__in=["queued", "running"]).exists(),
        60,
        message="runs to end",
    )


@pytest.fixture
def client(live_server_url, worker, alice):
    with Client(live_server_url, alice.raw_key, backoff_base=0.05) as c:
        yield c
    settle()


@pytest.fixture
def proxy(live_server_url):
    url = urlsplit(live_server_url)
    p = TcpProxy((url.hostname, url.port))
    yield p
    p.close()


def test_create_wait_get_list_and_events(client, make_chain):
    make_chain("demo", models=[fake(tokens=4), fake(tokens=3)])
    handle = client.runs.create("demo", {"topic": "tides"}, metadata={"customer": "c1"})
    assert handle["status"] == "queued" and handle["chain"] == "demo"
    seen: list[dict] = []
    run = client.runs.wait(handle["run_id"], timeout=60, on_progress=seen.append)
    assert run["status"] == "completed"
    assert run["usage"]["output_tokens"] == 7 and run["metadata"] == {"customer": "c1"}
    assert seen[-1]["progress"]["agents_completed"] == 2
    assert client.runs.get(handle["run_id"]) == run
    others = [client.runs.create("demo", {"topic": f"t{i}"})["run_id"] for i in range(2)]
    # limit=1 makes three pages: the iterator follows `next` through all of them.
    listed = [r["run_id"] for r in client.runs.list(limit=1)]
    assert listed == [*reversed(others), handle["run_id"]]
    events = list(client.runs.events(handle["run_id"]))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run.queued" and events[-1].type == "run.completed"


def test_stream_a_run_and_start_and_stream(client, make_chain):
    make_chain("demo", models=[fake(tokens=6)])
    run_id = client.runs.create("demo", {"topic": "tides"})["run_id"]
    events = list(client.runs.stream(run_id))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "run.completed" and events[-1].is_terminal
    assert len("".join(e.chunk for e in events).split()) == 6
    started = list(client.runs.stream(chain="demo", input={"topic": "waves"}))
    assert started[0].type == "run.queued" and started[-1].type == "run.completed"
    assert started[0].run_id != run_id
    assert client.runs.get(started[0].run_id)["status"] == "completed"
    # Following an ended run from its last event: nothing, at once (the server's 204).
    assert list(client.runs.stream(run_id, after=events[-1].seq)) == []


def test_stream_resumes_after_the_connection_is_cut(
    live_server_url, worker, alice, make_chain, proxy
):
    """The server side of the connection drops mid-stream; the client reconnects with
    Last-Event-ID and yields every event exactly once, in order."""
    make_chain("demo", models=[fake(tokens=30, latency_ms=60)])
    with Client(proxy.url, alice.raw_key, backoff_base=0.05) as c:
        run_id = c.runs.create("demo", {"topic": "tides"})["run_id"]
        events = []
        for event in c.runs.stream(run_id):
            events.append(event)
            if len(events) in (4, 9):
                proxy.drop_all()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "run.completed"
    assert len("".join(e.chunk for e in events).split()) == 30
    resumed = resumed_from(proxy)
    assert len(resumed) >= 2, proxy.requests
    assert resumed[0] >= 4 and 9 <= resumed[1] < events[-1].seq
    settle()


def test_start_and_stream_resumes_on_the_same_run(
    live_server_url, worker, alice, make_chain, proxy
):
    make_chain("demo", models=[fake(tokens=20, latency_ms=60)])
    with Client(proxy.url, alice.raw_key, backoff_base=0.05) as c:
        events = []
        for event in c.runs.stream(chain="demo", input={"topic": "tides"}):
            events.append(event)
            if len(events) == 5:
                proxy.drop_all()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "run.completed"
    assert Run.objects.count() == 1
    assert 5 <= resumed_from(proxy)[0] < events[-1].seq
    settle()


def test_429_is_retried_with_the_same_key_making_one_run(
    live_server_url, worker, alice, make_chain, proxy
):
    """One active run at most: the second create gets 429 concurrency_limit, waits out
    Retry-After and is sent again with the same Idempotency-Key, making exactly one run."""
    make_chain("demo", models=[fake(tokens=10, latency_ms=100)])
    ApiKey.objects.filter(pk=alice.key.pk).update(max_active_runs=1)
    with Client(proxy.url, alice.raw_key, backoff_base=0.05) as c:
        first = c.runs.create("demo", {"topic": "one"})
        second = c.runs.create("demo", {"topic": "two"}, metadata={"n": 2})
        assert second["run_id"] != first["run_id"]
        creates = proxy.requests_with("POST /api/v1/chains/demo/runs")
        assert len(creates) >= 3, "the second create was refused at least once"
        keys = {
            line.split(":", 1)[1].strip()
            for r in creates[1:]
            for line in r.split("\r\n")
            if line.lower().startswith("idempotency-key:")
        }
        assert len(keys) == 1
        assert Run.objects.filter(metadata={"n": 2}).count() == 1
        # Without retries the refusal surfaces as a typed error with the problem fields.
    with Client(live_server_url, alice.raw_key, max_attempts=1) as strict:
        strict.runs.wait(second["run_id"], 60)
        strict.runs.create("demo", {"topic": "three"})
        with pytest.raises(RateLimitError) as caught:
            strict.runs.create("demo", {"topic": "four"})
    assert caught.value.status == 429 and caught.value.code == "concurrency_limit"
    assert caught.value.retry_after and caught.value.violated_policies
    settle()


def test_typed_errors(client, live_server_url, bob, make_chain):
    make_chain("demo", models=[fake(tokens=2)])
    with (
        Client(live_server_url, "ak_" + "x" * 40) as stranger,
        pytest.raises(AuthenticationError) as caught,
    ):
        list(stranger.chains.list())
    assert caught.value.status == 401 and caught.value.code == "authentication_failed"
    with pytest.raises(NotFoundError) as caught:
        client.runs.get(str(uuid.uuid4()))
    assert caught.value.status == 404
    with Client(live_server_url, bob.raw_key) as other:
        bobs = other.runs.create("demo", {"topic": "secret"})
        other.runs.wait(bobs["run_id"], 30)
    with pytest.raises(NotFoundError):
        client.runs.get(bobs["run_id"])
    with pytest.raises(ValidationError) as caught:
        client.runs.create("demo", {"topic": ""})
    assert caught.value.code == "validation_error"
    assert any(e["field"].startswith("input") for e in caught.value.errors)
    with pytest.raises(NotFoundError):
        client.chains.get("demo", version=99)
    key = str(uuid.uuid4())
    run = client.runs.create("demo", {"topic": "a"}, idempotency_key=key)
    assert client.runs.create("demo", {"topic": "a"}, idempotency_key=key) == run
    with pytest.raises(ConflictError) as caught:
        client.runs.create("demo", {"topic": "b"}, idempotency_key=key)
    assert caught.value.code == "idempotency_key_reused"
    client.runs.wait(run["run_id"], 30)
    with pytest.raises(ConflictError) as caught:
        client.runs.cancel(run["run_id"])
    assert caught.value.code == "run_not_cancellable" and caught.value.status == 409


def test_invoke_cancel_and_chains(client, make_chain):
    make_chain("demo", models=[fake(tokens=3)], description="Two words")
    done = client.runs.invoke("demo", {"topic": "tides"})
    assert done["status"] == "completed" and done["output"]
    make_chain("broken", models=[fake(fail=400)])
    with pytest.raises(ChainFailedError) as caught:
        client.runs.invoke("broken", {"topic": "tides"})
    assert caught.value.status == 502 and caught.value.run_id
    assert client.runs.get(caught.value.run_id)["status"] == "failed"
    make_chain("slow", models=[fake(tokens=200, latency_ms=100)])
    slow = client.runs.create("slow", {"topic": "tides"})
    with pytest.raises(WaitTimeout) as gave_up:
        client.runs.wait(slow["run_id"], timeout=0.5)
    assert gave_up.value.run["status"] in ("queued", "running")
    wait_until(lambda: client.runs.get(slow["run_id"])["status"] == "running", 30)
    client.runs.cancel(slow["run_id"])
    assert client.runs.wait(slow["run_id"], 30)["status"] == "cancelled"
    names = {c["name"] for c in client.chains.list()}
    assert {"demo", "broken", "slow"} <= names
    assert client.chains.get("demo")["agents"][0]["name"] == "agent0"


def test_stream_ticket(client, live_server_url, make_chain):
    """What a server hands a browser: the ticket opens the run's event stream, without the key."""
    make_chain("demo", models=[fake(tokens=3)])
    run = client.runs.invoke("demo", {"topic": "tides"})
    ticket = client.runs.stream_ticket(run["run_id"])
    assert set(ticket) == {"ticket", "expires_at"}
    response = httpx.get(
        f"{live_server_url}/api/v1/runs/{run['run_id']}/events",
        params={"ticket": ticket["ticket"]},
        headers={"Accept": "text/event-stream"},
        timeout=30,
    )
    assert response.status_code == 200 and "event: run.completed" in response.text
    assert client.runs.stream_ticket()["ticket"] != ticket["ticket"]  # the feed's
    with pytest.raises(NotFoundError):
        client.runs.stream_ticket(str(uuid.uuid4()))


def test_webhook_endpoints_deliveries_and_verify(client, make_chain, receiver):
    make_chain("demo", models=[fake(tokens=3)])
    path = hook_path()
    endpoint = client.webhook_endpoints.create(receiver.base_url + path, description="mine")
    assert endpoint["secret"].startswith("whsec_")
    assert [e["id"] for e in client.webhook_endpoints.list()] == [endpoint["id"]]
    assert client.webhook_endpoints.get(endpoint["id"])["description"] == "mine"
    updated = client.webhook_endpoints.update(endpoint["id"], description="renamed")
    assert updated["description"] == "renamed"
    own = hook_path()
    run = client.runs.create(
        "demo", {"topic": "tides"}, webhook={"url": receiver.base_url + own, "secret": SECRET}
    )
    wait_until(lambda: receiver.requests_for(path) and receiver.requests_for(own), 30)
    [received] = receiver.requests_for(path)
    payload = verify_webhook(received.body, received.headers, endpoint["secret"])
    assert payload["type"] == "run.completed" and payload["data"]["run_id"] == run["run_id"]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(received.body + b" ", received.headers, endpoint["secret"])
    with pytest.raises(WebhookVerificationError):
        verify_webhook(received.body, received.headers, SECRET)

    deliveries = list(client.deliveries.list(run["run_id"]))
    assert len(deliveries) == 2
    wait_until(
        lambda: all(d["status"] == "succeeded" for d in client.deliveries.list(run["run_id"])), 30
    )
    mine = next(d for d in deliveries if d["url"].endswith(path))
    assert client.deliveries.resend(mine["id"])["id"] == mine["id"]
    wait_until(lambda: len(receiver.requests_for(path)) == 2, 30)
    client.runs.resend_webhooks(run["run_id"])
    wait_until(lambda: len(receiver.requests_for(path)) == 3, 30)
    wait_until(lambda: len(receiver.requests_for(own)) >= 2, 30)

    rotated = client.webhook_endpoints.rotate_secret(endpoint["id"])
    assert rotated["secret"] != endpoint["secret"]
    client.deliveries.resend(mine["id"])
    wait_until(lambda: len(receiver.requests_for(path)) == 4, 30)
    resent = receiver.requests_for(path)[-1]
    both = [rotated["secret"], endpoint["secret"]]
    for secret in (rotated["secret"], endpoint["secret"], both):
        assert verify_webhook(resent.body, resent.headers, secret)["id"] == payload["id"]
    client.webhook_endpoints.delete(endpoint["id"])
    with pytest.raises(NotFoundError):
        client.webhook_endpoints.get(endpoint["id"])


def test_async_client(live_server_url, worker, alice, make_chain, proxy):
    make_chain("demo", models=[fake(tokens=12, latency_ms=60)])

    async def scenario():
        async with AsyncClient(proxy.url, alice.raw_key, backoff_base=0.05) as c:
            handle = await c.runs.create("demo", {"topic": "tides"})
            events = []
            async for event in c.runs.stream(handle["run_id"]):
                events.append(event)
                if len(events) == 3:
                    proxy.drop_all()
            run = await c.runs.wait(handle["run_id"], 30)
            listed = [r["run_id"] async for r in c.runs.list()]
            chains = [ch["name"] async for ch in c.chains.list()]
            with pytest.raises(NotFoundError):
                await c.runs.get(str(uuid.uuid4()))
            after_end = [e async for e in c.runs.stream(handle["run_id"], after=events[-1].seq)]
            assert after_end == []  # the server's 204: nothing left
            return events, run, listed, chains

    events, run, listed, chains = asyncio.run(scenario())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "run.completed" and run["status"] == "completed"
    assert listed == [run["run_id"]] and chains == ["demo"]
    assert 3 <= resumed_from(proxy)[0] < events[-1].seq
    settle()


def test_in_progress_conflict_is_retried_until_the_first_answer(
    live_server_url, worker, alice, make_chain, proxy
):
    """A second invoke with the key of one still being answered gets 409
    idempotency_request_in_progress; the client waits it out and gets the first answer."""
    make_chain("demo", models=[fake(tokens=15, latency_ms=100)])
    key = str(uuid.uuid4())
    first: dict = {}

    def invoke_first():
        with Client(live_server_url, alice.raw_key) as c:
            first.update(c.runs.invoke("demo", {"topic": "tides"}, idempotency_key=key))

    thread = threading.Thread(target=invoke_first)
    thread.start()
    wait_until(lambda: Run.objects.exists(), 10)
    with Client(proxy.url, alice.raw_key, backoff_base=0.05) as c:
        second = c.runs.invoke("demo", {"topic": "tides"}, idempotency_key=key)
    thread.join(30)
    assert second == first and second["status"] == "completed"
    assert len(proxy.requests_with(f"idempotency-key: {key}")) >= 2
    assert Run.objects.count() == 1
    settle()


def test_rerun_batch_filters_and_endpoint_tools(client, make_chain, receiver, alice):
    make_chain("demo", models=[fake(tokens=3)])
    handles = client.runs.create_batch("demo", [{"topic": "a"}, {"input": {"topic": "b"}}])
    assert [client.runs.get(h["run_id"])["input"]["topic"] for h in handles] == ["a", "b"]
    with pytest.raises(ValidationError) as refused:
        client.runs.create_batch("demo", [{"topic": "ok"}, {"topic": ""}])
    assert [e["field"] for e in refused.value.errors] == ["items[1].input.topic"]
    first = client.runs.wait(handles[0]["run_id"], timeout=60)
    again = client.runs.rerun(first["run_id"], metadata={"retry": True})
    rerun = client.runs.wait(again["run_id"], timeout=60)
    assert rerun["rerun_of"] == first["run_id"] and rerun["metadata"] == {"retry": True}
    assert rerun["input"] == first["input"] and rerun["output"] == first["output"]
    # Filtered: only the named events, each with its seq; the stream ends with the run even
    # though its terminal event is not among them.
    outputs = list(client.runs.stream(chain="demo", input={"topic": "c"}, events=["agent.output"]))
    assert outputs and {e.type for e in outputs} == {"agent.output"}
    run_id = outputs[0].run_id
    assert client.runs.get(run_id)["status"] == "completed"
    stored = list(client.runs.events(run_id, events=["agent.output", "run.completed"]))
    assert [e.seq for e in stored[:-1]] == [e.seq for e in outputs]
    assert stored[-1].type == "run.completed"
    # Webhook endpoint tools.
    path = hook_path()
    endpoint = client.webhook_endpoints.create(receiver.base_url + path)
    sent = client.webhook_endpoints.test(endpoint["id"])
    wait_until(lambda: receiver.requests_for(path), 30, message="the test event")
    payload = verify_webhook(
        receiver.requests_for(path)[0].body,
        receiver.requests_for(path)[0].headers,
        endpoint["secret"],
    )
    assert payload["type"] == "webhook.test" and payload["id"] == sent["webhook_id"]
    assert client.webhook_endpoints.recover(endpoint["id"], "2000-01-01T00:00:00Z") == {
        "count": 0,
        "delivery_ids": [],
    }


def test_async_rerun_batch_and_filters(live_server_url, worker, alice, make_chain):
    make_chain("demo", models=[fake(tokens=2)])

    async def scenario():
        async with AsyncClient(live_server_url, alice.raw_key, backoff_base=0.05) as c:
            handles = await c.runs.create_batch("demo", [{"topic": "a"}, {"topic": "b"}])
            done = await c.runs.wait(handles[1]["run_id"], timeout=60)
            again = await c.runs.rerun(done["run_id"], input={"topic": "z"})
            rerun = await c.runs.wait(again["run_id"], timeout=60)
            ends = [e async for e in c.runs.stream(again["run_id"], events=["run.completed"])]
            return done, rerun, ends

    try:
        done, rerun, ends = asyncio.run(scenario())
    finally:
        settle()
    assert rerun["rerun_of"] == done["run_id"] and rerun["input"] == {"topic": "z"}
    assert [e.type for e in ends] == ["run.completed"]
