from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from runs.models import Run, RunEvent, RunStatus
from tests.conftest import fake
from tests.test_auth import assert_problem

TOPIC = {"input": {"topic": "tides"}}


@pytest.fixture
def chain(make_chain):
    return make_chain("demo")


def create(api, body=None, chain="demo"):
    response = api.post(f"/api/v1/chains/{chain}/runs", TOPIC if body is None else body)
    assert response.status_code == 202, response.content
    return response.json()


def test_create_answers_202_with_handle(alice, chain):
    response = alice.post("/api/v1/chains/demo/runs", {**TOPIC, "metadata": {"ticket": "T-1"}})
    assert response.status_code == 202
    body = response.json()
    run_id = body["run_id"]
    assert response["Location"] == f"/api/v1/runs/{run_id}"
    assert body == {
        "run_id": run_id,
        "status": "queued",
        "chain": "demo",
        "version": 1,
        "created_at": body["created_at"],
        "estimated_duration_s": chain.estimated_duration_s,
        "poll_url": f"/api/v1/runs/{run_id}",
        "events_url": f"/api/v1/runs/{run_id}/events",
        "ws_url": f"/ws/v1/runs/{run_id}",
    }
    assert body["created_at"].endswith("Z") and len(body["created_at"]) == 24
    run = Run.objects.get(pk=run_id)
    assert run.status == RunStatus.QUEUED and run.metadata == {"ticket": "T-1"}
    assert run.owner == alice.key.owner
    event = RunEvent.objects.get(run=run)
    assert (event.seq, event.type) == (1, "run.queued")
    assert event.data["chain"] == "demo" and event.data["version"] == 1


def test_create_pins_version(alice, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    make_chain("demo", models=[fake(tokens=3), fake(tokens=3)])
    assert create(alice)["version"] == 2
    pinned = create(alice, {**TOPIC, "version": 1})
    assert pinned["version"] == 1
    assert Run.objects.get(pk=pinned["run_id"]).agents_total == 1
    body = assert_problem(
        alice.post("/api/v1/chains/demo/runs", {**TOPIC, "version": 9}), 404, "not_found"
    )
    assert "version 9" in body["detail"]


def test_unknown_chain_is_404(alice, chain):
    assert_problem(alice.post("/api/v1/chains/nope/runs", TOPIC), 404, "not_found")
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    "body, fields",
    [
        ({}, ["input.topic"]),
        ({"input": {}}, ["input.topic"]),
        ({"input": {"topic": 5}}, ["input.topic"]),
        ({"input": {"topic": ""}}, ["input.topic"]),
        ({"input": {"topic": "x", "n": "y"}, "inputs": {}}, ["inputs"]),
        ({"input": "tides"}, ["input"]),
        ({"input": {"topic": "x"}, "version": "latest"}, ["version"]),
        ({"input": {"topic": "x"}, "version": 0}, ["version"]),
        ({"input": {"topic": "x"}, "metadata": []}, ["metadata"]),
        ({"input": {"topic": "x"}, "metadata": {"k": {"nested": 1}}}, ["metadata"]),
        ({"input": {"topic": "x"}, "webhook": {"url": "https://example.com"}}, ["webhook.secret"]),
    ],
)
def test_invalid_body_lists_each_field(alice, chain, body, fields):
    response = alice.post("/api/v1/chains/demo/runs", body)
    problem = assert_problem(response, 400, "validation_error")
    assert sorted(e["field"] for e in problem["errors"]) == fields
    assert all(e["message"] for e in problem["errors"])
    assert not Run.objects.exists()


def test_schema_errors_name_nested_fields(alice, make_chain):
    make_chain(
        "nested",
        schema={
            "type": "object",
            "required": ["items", "mode"],
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["fast", "slow"]},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id"],
                        "properties": {"id": {"type": "integer"}},
                    },
                },
            },
        },
    )
    body = {"input": {"mode": "medium", "items": [{"id": 1}, {"id": "two"}, {}], "extra": 1}}
    problem = assert_problem(
        alice.post("/api/v1/chains/nested/runs", body), 400, "validation_error"
    )
    assert sorted(e["field"] for e in problem["errors"]) == [
        "input",
        "input.items[1].id",
        "input.items[2].id",
        "input.mode",
    ]


def test_get_run(alice, chain):
    run_id = create(alice, {**TOPIC, "metadata": {"a": 1}})["run_id"]
    response = alice.get(f"/api/v1/runs/{run_id}")
    assert response.status_code == 200
    assert response["Retry-After"] == "2"
    body = response.json()
    assert body["status"] == "queued"
    assert body["input"] == {"topic": "tides"}
    assert body["output"] is None and body["error"] is None
    assert body["progress"] == {"current_agent": None, "agents_completed": 0, "agents_total": 1}
    assert body["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    assert body["cost"] == "0.000000"
    assert body["metadata"] == {"a": 1}
    assert body["webhook"] is None


def test_poll_interval_grows_after_30_s(alice, chain):
    run_id = create(alice)["run_id"]
    Run.objects.filter(pk=run_id).update(created_at=timezone.now() - timedelta(seconds=31))
    assert alice.get(f"/api/v1/runs/{run_id}")["Retry-After"] == "5"


def test_terminal_run_has_no_retry_after(alice, chain):
    run_id = create(alice)["run_id"]
    alice.post(f"/api/v1/runs/{run_id}/cancel")
    assert "Retry-After" not in alice.get(f"/api/v1/runs/{run_id}")


def test_list_newest_first_with_cursor(alice, chain):
    ids = [create(alice)["run_id"] for _ in range(5)]
    page = alice.get("/api/v1/runs", {"limit": 2}).json()
    seen = [r["run_id"] for r in page["results"]]
    while page["next"]:
        page = alice.client.get(page["next"], headers=alice._headers(None)).json()
        seen += [r["run_id"] for r in page["results"]]
    assert seen == ids[::-1]


def test_list_filters(alice, make_chain):
    make_chain("one")
    make_chain("two")
    a = create(alice, chain="one")["run_id"]
    b = create(alice, chain="two")["run_id"]
    alice.post(f"/api/v1/runs/{a}/cancel")

    def ids(**params):
        response = alice.get("/api/v1/runs", params)
        assert response.status_code == 200, response.content
        return [r["run_id"] for r in response.json()["results"]]

    assert ids(status="cancelled") == [a]
    assert ids(status="queued,cancelled") == [b, a]
    assert ids(chain="two") == [b]
    assert ids(created_after="2000-01-01T00:00:00Z") == [b, a]
    assert ids(created_after=(timezone.now() + timedelta(hours=1)).isoformat()) == []
    # Offsets PostgreSQL cannot take (over 15:59) are RFC 3339's all the same: no 500.
    assert ids(created_after="2000-01-01T00:00:00-17:45") == [b, a]
    assert ids(created_after="2999-12-31T22:00:00-17:45") == []


@pytest.mark.parametrize(
    "params, field",
    [
        ({"status": "done"}, "status"),
        ({"chain": "nope"}, "chain"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "2026-01-01T00:00:00"}, "created_after"),
        ({"created_after": ""}, "created_after"),  # a date-time, as the OpenAPI document says
        ({"created_after": "0001-01-01T00:00:00+01:00"}, "created_after"),  # before year 1 in UTC
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "!!!"}, "cursor"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_list_rejects_bad_query(alice, chain, params, field):
    problem = assert_problem(alice.get("/api/v1/runs", params), 400, "validation_error")
    assert [e["field"] for e in problem["errors"]] == [field]


def test_cancel_queued_run(alice, chain):
    run_id = create(alice)["run_id"]
    response = alice.post(f"/api/v1/runs/{run_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = alice.post(f"/api/v1/runs/{run_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    events = list(RunEvent.objects.filter(run_id=run_id).values_list("seq", "type"))
    assert events == [(1, "run.queued"), (2, "run.cancelled")]
    assert RunEvent.objects.get(run_id=run_id, seq=2).data["reason"] == "api"


def test_cancel_running_run_asks_it_to_stop(alice, chain):
    run_id = create(alice)["run_id"]
    Run.objects.filter(pk=run_id).update(status=RunStatus.RUNNING)
    response = alice.post(f"/api/v1/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert response.json()["cancel_requested"] is True


@pytest.mark.parametrize("status", ["completed", "failed", "timed_out"])
def test_cancel_ended_run_is_409(alice, chain, status):
    run_id = create(alice)["run_id"]
    Run.objects.filter(pk=run_id).update(status=status)
    problem = assert_problem(
        alice.post(f"/api/v1/runs/{run_id}/cancel"), 409, "run_not_cancellable"
    )
    assert problem["run_id"] == run_id


def test_events_page(alice, chain):
    run_id = create(alice)["run_id"]
    alice.post(f"/api/v1/runs/{run_id}/cancel")
    body = alice.get(f"/api/v1/runs/{run_id}/events").json()
    assert [e["seq"] for e in body["results"]] == [1, 2]
    assert body["next_after"] == 2
    first = body["results"][0]
    assert first["event"] == "run.queued"
    assert first["data"]["run_id"] == run_id and first["data"]["seq"] == 1
    assert first["data"]["ts"] == first["ts"]
    after = alice.get(f"/api/v1/runs/{run_id}/events", {"after": 1}).json()
    assert [e["event"] for e in after["results"]] == ["run.cancelled"]
    empty = alice.get(f"/api/v1/runs/{run_id}/events", {"after": 2}).json()
    assert empty == {"results": [], "next_after": 2}
    assert_problem(
        alice.get(f"/api/v1/runs/{run_id}/events", {"after": "-1"}), 400, "validation_error"
    )


def test_tenant_isolation_on_every_run_endpoint(alice, bob, chain):
    run_id = create(alice)["run_id"]
    for path in (f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/events"):
        assert_problem(bob.get(path), 404, "not_found")
    assert_problem(bob.post(f"/api/v1/runs/{run_id}/cancel"), 404, "not_found")
    assert bob.get("/api/v1/runs").json()["results"] == []
    assert Run.objects.get(pk=run_id).status == RunStatus.QUEUED
    # Same answer as for a run that does not exist at all.
    missing = bob.get(f"/api/v1/runs/{uuid.uuid4()}").json()
    theirs = bob.get(f"/api/v1/runs/{run_id}").json()
    assert {k: v for k, v in missing.items() if k != "instance"} == {
        k: v for k, v in theirs.items() if k != "instance"
    }


def test_run_detail_query_count(alice, chain, django_assert_max_num_queries):
    run_id = create(alice)["run_id"]
    alice.get(f"/api/v1/runs/{run_id}")  # last_used_at written once
    with django_assert_max_num_queries(2):
        assert alice.get(f"/api/v1/runs/{run_id}").status_code == 200


def test_run_list_query_count_is_flat(alice, chain, django_assert_max_num_queries):
    for _ in range(10):
        create(alice)
    with django_assert_max_num_queries(2):
        assert len(alice.get("/api/v1/runs").json()["results"]) == 10


def test_created_after_a_runs_own_created_at_leaves_that_run_out(alice, chain):
    """Timestamps are shown to the millisecond: a value copied from an answer is a boundary."""
    first = create(alice)
    second = create(alice)
    run = Run.objects.get(pk=first["run_id"])
    # A second earlier, so it stays before the second run whatever their microseconds.
    run.created_at = (run.created_at - timedelta(seconds=1)).replace(microsecond=123456)
    run.save(update_fields=["created_at"])
    shown = alice.get(f"/api/v1/runs/{first['run_id']}").json()["created_at"]
    assert shown.endswith(".123Z")

    def ids(created_after):
        response = alice.get("/api/v1/runs", {"created_after": created_after})
        assert response.status_code == 200, response.content
        return [r["run_id"] for r in response.json()["results"]]

    assert first["run_id"] not in ids(shown)
    assert ids(second["created_at"]) == []
    # One millisecond earlier than shown, the run is after it.
    earlier = shown.replace(".123Z", ".122Z")
    assert first["run_id"] in ids(earlier)
    assert ids("9999-12-31T23:59:59.999+00:00") == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": {"topic": "x", "n": [1, {"a": None}]}},
        {"input": {}, "metadata": {"k": "v", "n": 1.5, "b": True, "z": None}},
    ],
)
def test_a_plain_create_body_validates_as_the_serializer_does(body):
    from runs.api import RunCreateInput, create_body

    serializer = RunCreateInput(data=body)
    serializer.is_valid(raise_exception=True)
    assert create_body(body) == dict(serializer.validated_data)


@pytest.mark.parametrize(
    "body",
    [
        {"input": None},
        {"input": []},
        {"metadata": {"k": "x" * 501}},
        {"metadata": {"k" * 41: 1}},
        {"metadata": {"k": {"nested": 1}}},
        {"input": {}, "extra": 1},
    ],
)
def test_a_bad_create_body_gets_the_serializers_errors(body):
    from rest_framework.exceptions import ValidationError

    from runs.api import RunCreateInput, create_body

    serializer = RunCreateInput(data=body)
    assert not serializer.is_valid()
    with pytest.raises(ValidationError) as raised:
        create_body(body)
    assert raised.value.detail == serializer.errors
