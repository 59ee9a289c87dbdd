"""Tenant isolation, as a table: every route that takes the id of an owned object, every list,
every create (idempotency keys are per owner) and both streams, exercised by bob against alice's
objects over a real server. docs/api.md: another owner's object answers 404, exactly like a missing
one, and nothing of it changes.

The tables are checked against the URL conf and the OpenAPI document, so a new route fails
`test_every_route_is_classified` until it is added to one of them (one line each)."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass

import httpx
import pytest
from django.db.models import Q
from django.urls import URLResolver, get_resolver
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from websockets.sync.client import connect

from agentsvc.models import IdempotencyRecord
from runs.models import TERMINAL_EVENTS, Run
from runs.routing import websocket_urlpatterns
from runs.services import run_create
from schedules.models import Schedule
from schedules.services import schedule_create, schedules_fire_due
from tests.conftest import fake, wait_until
from tests.test_ws import frames_until_close
from tests.webhook_support import SECRET, deliver_all, finished_run, hook_path
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


@dataclass(frozen=True)
class Owned:
    """An operation on one object of an owner. `kind` names which of alice's objects bob aims
    it at; `sample` the one alice uses to show the call works; `status` what she gets."""

    method: str
    path: str
    kind: str  # run | endpoint | delivery | schedule
    status: int
    sample: str = ""  # default: the kind itself ("run" is her finished run)
    body: dict | None = None
    accept: str | None = None


# Every operation that takes an owned object's id. Several lines may share one operation.
OWNED = [
    Owned("GET", "/api/v1/runs/{run_id}", "run", 200),
    Owned("POST", "/api/v1/runs/{run_id}/cancel", "run", 200, sample="queued"),
    Owned("POST", "/api/v1/runs/{run_id}/rerun", "run", 202, body={}),
    Owned(
        "POST",
        "/api/v1/runs/{run_id}/input",
        "run",
        202,
        sample="waiting",
        body={"request_id": "req_isolation", "approve": True},
    ),
    Owned("GET", "/api/v1/runs/{run_id}/events", "run", 200),
    Owned("GET", "/api/v1/runs/{run_id}/events", "run", 200, accept="text/event-stream"),
    Owned("GET", "/api/v1/runs/{run_id}/deliveries", "run", 200),
    Owned("POST", "/api/v1/runs/{run_id}/webhooks/resend", "run", 202),
    Owned("GET", "/api/v1/webhook-endpoints/{endpoint_id}", "endpoint", 200),
    Owned(
        "PATCH",
        "/api/v1/webhook-endpoints/{endpoint_id}",
        "endpoint",
        200,
        body={"description": "x"},
    ),
    Owned("POST", "/api/v1/webhook-endpoints/{endpoint_id}/rotate-secret", "endpoint", 200),
    Owned("POST", "/api/v1/webhook-endpoints/{endpoint_id}/test", "endpoint", 202),
    Owned(
        "POST",
        "/api/v1/webhook-endpoints/{endpoint_id}/recover",
        "endpoint",
        202,
        body={"since": "2000-01-01T00:00:00Z"},
    ),
    Owned("DELETE", "/api/v1/webhook-endpoints/{endpoint_id}", "endpoint", 204),
    Owned("POST", "/api/v1/deliveries/{delivery_id}/resend", "delivery", 202),
    # The run's id in the body ("{id}"): no ticket for another owner's run.
    Owned("POST", "/api/v1/stream-tickets", "run", 201, body={"run_id": "{id}"}),
    Owned("GET", "/api/v1/schedules/{schedule_id}", "schedule", 200),
    Owned("POST", "/api/v1/schedules/{schedule_id}/pause", "schedule", 200),
    Owned("POST", "/api/v1/schedules/{schedule_id}/resume", "schedule", 200),
    Owned("DELETE", "/api/v1/schedules/{schedule_id}", "schedule", 204),
]
# Lists (and the id field of their items): only the caller's objects, whatever the filters and
# the cursor (even one taken from another owner's page).
LISTS = {
    ("GET", "/api/v1/runs"): "run_id",
    ("GET", "/api/v1/webhook-endpoints"): "id",
    ("GET", "/api/v1/schedules"): "schedule_id",
}
LIST_QUERIES = [{}, {"limit": 100}]
RUN_LIST_QUERIES = [
    {"status": "queued,completed,cancelled"},
    {"chain": "demo"},
    {"created_after": "2000-01-01T00:00:00Z"},
]
# Creates: a retry with the same Idempotency-Key replays only the same owner's first answer.
CREATES = {
    ("POST", "/api/v1/chains/{name}/runs"): {"input": {"topic": "tides"}},
    ("POST", "/api/v1/chains/{name}/invoke"): {"input": {"topic": "tides"}, "wait_s": 0},
    ("POST", "/api/v1/chains/{name}/runs/batch"): {"items": [{"input": {"topic": "tides"}}]},
    ("POST", "/api/v1/chains/{name}/stream"): {
        "input": {"topic": "tides"},
        "cancel_on_disconnect": True,
    },
    ("POST", "/api/v1/webhook-endpoints"): {},  # the receiver's URL, filled in
    ("POST", "/api/v1/stream-tickets"): {},  # the caller's feed
    ("POST", "/api/v1/chains/{name}/schedules"): {"interval_s": 3600, "input": {"topic": "t"}},
}
# API operations that hold no tenant data.
SHARED = {
    ("GET", "/api/v1/chains"): "chains are published to every tenant",
    ("GET", "/api/v1/chains/{name}"): "chains are published to every tenant",
}
# Routes outside the tenant API.
NOT_TENANT = {
    "/healthz": "no data",
    "/readyz": "states of backing services, no tenant data",
    "/metrics": "totals across tenants, optionally behind METRICS_TOKEN",
    "/api/problems/{code}": "static problem pages",
    "/api/v1/schema": "the OpenAPI document",
    "/api/docs": "Swagger UI",
    "/admin/": "staff only (tests/test_admin.py, tests/test_security.py)",
    "/dashboard/": "staff only (tests/test_security.py)",
    "/dashboard/state": "staff only (tests/test_security.py)",
    "/dashboard/series": "staff only (tests/test_security.py)",
    "/dashboard/runs/{run_id}/cancel": "staff only, with the CSRF token (tests/test_security.py)",
}
WEBSOCKETS = {
    "/ws/v1/runs/{run_id}": "one run's events: 4404 for another owner's run",
    "/ws/v1/runs": "the status feed: the key owner's runs only",
}


def _templates(patterns, prefix: str = "/") -> list[tuple[str, object]]:
    """(path template, view) of every route, `<uuid:run_id>` written `{run_id}` as in OpenAPI."""
    found = []
    for p in patterns:
        route = prefix + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(p.pattern))
        if isinstance(p, URLResolver) and p.namespace != "admin":
            found.extend(_templates(p.url_patterns, route))
        else:
            found.append((route, getattr(p, "callback", None)))
    return found


def _openapi() -> dict:
    """The OpenAPI document as /api/v1/schema serves it."""
    return SchemaGenerator().get_schema(request=None, public=True)


def test_every_route_is_classified(db):
    doc = _openapi()
    operations = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    classified = {(o.method, o.path) for o in OWNED} | set(LISTS) | set(CREATES) | set(SHARED)
    assert operations == classified, (
        f"unclassified: {sorted(operations - classified)}; gone: {sorted(classified - operations)}"
    )
    documented = {path for _, path in operations}
    for route, view in _templates(get_resolver().url_patterns):
        assert route in documented or route in NOT_TENANT, f"{route}: not in the isolation matrix"
        # A method a class-based view implements but the document does not show is untested.
        cls = getattr(view, "cls", None) or getattr(view, "view_class", None)
        if route in documented and cls is not None:
            methods = {m.upper() for m in cls.http_method_names if m not in ("options", "head")}
            implemented = {m for m in methods if hasattr(cls, m.lower())}
            assert implemented == {m for m, p in operations if p == route}, route
    assert {route for route, _ in _templates(websocket_urlpatterns)} == set(WEBSOCKETS)


# --- Against a live server --------------------------------------------------------------------


@dataclass
class Objects:
    run: Run  # finished, with a delivery to the run's webhook and one to an endpoint
    queued: Run
    waiting: Run  # waiting for an approval
    endpoint: WebhookEndpoint
    delivery: WebhookDelivery
    schedule: Schedule  # its tick started one of her runs

    def ids(self, kind: str) -> list[str]:
        if kind == "run":
            return [str(self.run.id), str(self.queued.id), str(self.waiting.id)]
        return [str(getattr(self, kind).id)]

    def sample(self, case: Owned) -> str:
        return str(getattr(self, case.sample or case.kind).id)


def _path(template: str, object_id: str) -> str:
    return re.sub(r"\{\w+\}", object_id, template)


def _call(http: httpx.Client, api, case: Owned, object_id: str, **headers) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api.raw_key}", **headers}
    if case.accept:
        headers["Accept"] = case.accept
    body = None
    if case.method in ("POST", "PATCH") and case.body is not None:
        body = {k: object_id if v == "{id}" else v for k, v in case.body.items()}
    with http.stream(
        case.method, _path(case.path, object_id), json=body, headers=headers
    ) as response:
        response.read()
    return response


def _state(owner_id: int) -> dict:
    """Everything of an owner a foreign call could change."""
    return {
        "runs": list(Run.objects.filter(owner_id=owner_id).order_by("id").values()),
        "endpoints": list(
            WebhookEndpoint.objects.filter(owner_id=owner_id).order_by("id").values()
        ),
        # Of her runs, and the tests sent to her endpoints.
        "deliveries": list(
            WebhookDelivery.objects.filter(
                Q(message__run__owner_id=owner_id) | Q(endpoint__owner_id=owner_id)
            )
            .order_by("id")
            .values()
        ),
        "attempts": WebhookAttempt.objects.filter(
            Q(delivery__message__run__owner_id=owner_id) | Q(delivery__endpoint__owner_id=owner_id)
        ).count(),
        "idempotency": IdempotencyRecord.objects.filter(owner_id=owner_id).count(),
        "schedules": list(Schedule.objects.filter(owner_id=owner_id).order_by("id").values()),
    }


def _assert_like_missing(response: httpx.Response, missing: httpx.Response, what: str) -> None:
    assert response.status_code == 404, (what, response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json", what
    body = response.json()
    assert body["code"] == "not_found" and body["type"] == "/api/problems/not_found", what
    assert missing.status_code == 404, what
    assert missing.headers["content-type"] == "application/problem+json", what
    # Everything but the URL it was asked for: nothing tells the object exists.
    assert {k: v for k, v in body.items() if k != "instance"} == {
        k: v for k, v in missing.json().items() if k != "instance"
    }, what


def _bearer(api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.raw_key}"}


@pytest.fixture
def objects(live_server_url, alice, bob, make_chain, receiver, local_ok) -> Objects:
    """Alice's objects (and one run of bob's, so his lists are not trivially empty)."""
    url = receiver.base_url + hook_path()
    endpoint = WebhookEndpoint.objects.create(
        owner=alice.key.owner, url=url, secret=SECRET, events=list(TERMINAL_EVENTS)
    )
    run = finished_run(alice, make_chain, webhook={"url": url, "secret": SECRET})
    # A worker of the session may have taken the run before this process did: wait for its end.
    wait_until(lambda: Run.objects.get(pk=run.pk).is_terminal, 30, message="the run to end")
    deliver_all()
    delivery = WebhookDelivery.objects.filter(endpoint=endpoint).get()
    # Never enqueued: it stays queued even when a worker of the session is running.
    queued = Run.objects.create(
        owner=alice.key.owner, api_key=alice.key, chain=run.chain, input={"topic": "a"}
    )
    waiting = Run.objects.create(
        owner=alice.key.owner,
        api_key=alice.key,
        chain=run.chain,
        input={"topic": "w"},
        status="input_required",
        input_request={
            "request_id": "req_isolation",
            "key": "a0/approval",
            "kind": "approval",
            "agent": "agent0",
            "prompt": "Go?",
            "requested_at": "2026-01-01T00:00:00.000Z",
            "expires_at": "2099-01-01T00:00:00.000Z",
        },
    )
    run_create(api_key=bob.key, chain=run.chain, run_input={"topic": "b"}, metadata={})
    schedule = schedule_create(
        api_key=alice.key,
        chain_name="demo",
        version=None,
        cron="",
        tz="UTC",
        interval_s=3600,
        run_input={"topic": "s"},
        metadata={},
        webhook=None,
    )
    Schedule.objects.filter(pk=schedule.pk).update(next_run_at=timezone.now())
    schedules_fire_due()
    schedule.refresh_from_db()
    return Objects(
        run=run,
        queued=queued,
        waiting=waiting,
        endpoint=endpoint,
        delivery=delivery,
        schedule=schedule,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_foreign_ids_answer_like_missing_ones(live_server_url, alice, bob, objects):
    owner = alice.key.owner_id
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        # Bob first, on every object of the kind: a 404 identical to a missing object's.
        before = _state(owner)
        for case in OWNED:
            missing = _call(http, bob, case, str(uuid.uuid4()))
            for object_id in objects.ids(case.kind):
                what = f"{case.method} {case.path} {case.accept or ''} as bob"
                _assert_like_missing(_call(http, bob, case, object_id), missing, what)
        assert _state(owner) == before

        # Alice: the same calls work (so the 404s above are not a broken path), each POST with
        # an Idempotency-Key, which stores her answer. The DELETE comes last.
        key = {"Idempotency-Key": "isolation-1"}
        for case in OWNED:
            if case.method != "DELETE":
                response = _call(http, alice, case, objects.sample(case), **key)
                assert response.status_code == case.status, (case, response.text)
        deliver_all()  # her resends, so that nothing changes on its own from here
        after_alice = _state(owner)

        # Bob with alice's Idempotency-Key: still 404, never her stored answer.
        for case in OWNED:
            if case.method == "POST":
                response = _call(http, bob, case, objects.sample(case), **key)
                assert response.status_code == 404, (case, response.text)
                assert "Idempotent-Replayed" not in response.headers
        assert _state(owner) == after_alice
        delete = next(c for c in OWNED if c.method == "DELETE")
        assert _call(http, alice, delete, objects.sample(delete)).status_code == 204


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_lists_show_only_the_callers_objects(live_server_url, alice, bob, objects):
    with httpx.Client(base_url=live_server_url, timeout=30) as http:

        def page(api, path: str, params: dict) -> dict:
            response = http.get(path, params=params, headers=_bearer(api))
            assert response.status_code == 200, response.text
            return response.json()

        for (_, path), id_field in LISTS.items():
            # Alice's own page of one item, for a `next` cursor to hand to bob.
            theirs = {item[id_field] for item in page(alice, path, {"limit": 100})["results"]}
            assert theirs, path
            first = page(alice, path, {"limit": 1})
            queries = list(LIST_QUERIES)
            if first["next"]:
                queries.append({"cursor": httpx.URL(first["next"]).params["cursor"]})
            if path == "/api/v1/runs":
                queries += [*RUN_LIST_QUERIES, {"schedule": str(objects.schedule.id)}]
            for params in queries:
                shown = {item[id_field] for item in page(bob, path, params)["results"]}
                assert not shown & theirs, (path, params)
        # Bob's own run is listed: the filters above are not simply empty for him.
        assert len(page(bob, "/api/v1/runs", {"chain": "demo"})["results"]) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_idempotency_keys_are_per_owner(live_server_url, alice, bob, make_chain, receiver):
    make_chain("demo", models=[fake(tokens=2)])
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        for (method, template), body in CREATES.items():
            if template == "/api/v1/webhook-endpoints":
                body = {"url": receiver.base_url + hook_path()}
            path = template.replace("{name}", "demo")
            made = {}
            for api in (alice, bob):
                headers = {**_bearer(api), "Idempotency-Key": "same-key"}
                with http.stream(method, path, json=body, headers=headers) as response:
                    assert response.status_code in (200, 201, 202), response.read()
                    assert "Idempotent-Replayed" not in response.headers, (path, api.key.name)
                    if response.headers["content-type"] == "text/event-stream":
                        # Its run is in a header; hanging up cancels it.
                        made[api.key.name] = (response.headers["X-Run-Id"], None)
                    else:
                        data = json.loads(response.read())
                        data = data["results"][0] if "results" in data else data  # a batch
                        made[api.key.name] = (
                            data.get("run_id")
                            or data.get("id")
                            or data.get("schedule_id")
                            or data["ticket"],
                            data.get("secret"),
                        )
            (alice_id, alice_secret), (bob_id, bob_secret) = made["alice-key"], made["bob-key"]
            assert alice_id != bob_id, path
            assert alice_secret is None or alice_secret != bob_secret, path
    assert Run.objects.filter(owner=bob.key.owner).count() == 4
    assert WebhookEndpoint.objects.filter(owner=bob.key.owner).count() == 1
    assert Schedule.objects.filter(owner=bob.key.owner).count() == 1


def _ticket(url: str, api, body: dict) -> str | None:
    """A stream ticket of `api` (None when refused: 404)."""
    response = httpx.post(f"{url}/api/v1/stream-tickets", json=body, headers=_bearer(api))
    if response.status_code == 404:
        return None
    assert response.status_code == 201, response.text
    return response.json()["ticket"]


def _feed_started(feed, api, chain) -> None:
    """A feed counts what exists when it starts as sent, and it starts a moment after the
    handshake: make runs of its owner until one shows."""
    for _ in range(30):
        run_create(api_key=api.key, chain=chain, run_input={"topic": "t"}, metadata={})
        try:
            json.loads(feed.recv(timeout=1))
            return
        except TimeoutError:
            continue
    raise AssertionError("the feed never started")


def _drain(feed) -> None:
    with contextlib.suppress(TimeoutError):
        while True:
            feed.recv(timeout=0.3)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_websockets_keep_to_their_owner(live_server_url, alice, bob, objects):
    ws = live_server_url.replace("http://", "ws://")
    bobs_feed = _ticket(live_server_url, bob, {})
    for run_id in (objects.run.id, objects.queued.id, uuid.uuid4()):
        with connect(f"{ws}/ws/v1/runs/{run_id}", additional_headers=_bearer(bob)) as sock:
            assert frames_until_close(sock) == ([], 4404), run_id
        # No ticket of bob's opens it: he cannot get one for it, and his feed's is not one.
        assert _ticket(live_server_url, bob, {"run_id": str(run_id)}) is None
        with connect(f"{ws}/ws/v1/runs/{run_id}?after=0&ticket={bobs_feed}") as sock:
            assert frames_until_close(sock) == ([], 4401), run_id
    # Alice's own run: replayed, then closed 1000.
    ticket = _ticket(live_server_url, alice, {"run_id": str(objects.run.id)})
    with connect(f"{ws}/ws/v1/runs/{objects.run.id}?ticket={ticket}") as sock:
        frames, code = frames_until_close(sock)
    assert code == 1000 and frames[-1]["event"] in TERMINAL_EVENTS

    # The status feed: alice's change shows on hers and never on bob's.
    with (
        connect(f"{ws}/ws/v1/runs?ticket={_ticket(live_server_url, alice, {})}") as alice_feed,
        connect(f"{ws}/ws/v1/runs?ticket={bobs_feed}") as bob_feed,
    ):
        for feed, api in ((alice_feed, alice), (bob_feed, bob)):
            _feed_started(feed, api, objects.run.chain)
        _drain(alice_feed)
        _drain(bob_feed)
        response = httpx.post(
            f"{live_server_url}/api/v1/runs/{objects.queued.id}/cancel", headers=_bearer(alice)
        )
        assert response.status_code == 200, response.text
        # (A worker of the session may still be running the runs that started the feeds.)
        shown = ("", "")
        while shown != (str(objects.queued.id), "cancelled"):
            frame = json.loads(alice_feed.recv(timeout=30))["data"]
            shown = (frame["run_id"], frame["status"])
        # Then one of bob's: everything before it on his feed is his.
        mine = run_create(
            api_key=bob.key, chain=objects.run.chain, run_input={"topic": "t"}, metadata={}
        )
        seen = []
        while str(mine.id) not in seen:
            seen.append(json.loads(bob_feed.recv(timeout=30))["data"]["run_id"])
        assert not set(seen) & {str(r.id) for r in Run.objects.filter(owner=alice.key.owner)}
