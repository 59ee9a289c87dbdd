"""Scheduled runs: the API (every error), tenant isolation, and the ticks: one run per tick
however many fire it at once, missed ticks run once, a refused tick recorded and not retried,
the runs listed by schedule, and the executors' clock firing them for real."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.utils import timezone

from agentsvc.services import api_key_revoke
from runs.models import Chain, Run, RunStatus
from runs.services import run_cancel, run_create
from schedules.models import Schedule
from schedules.services import schedule_tick, schedules_fire_due
from tests.conftest import Api, wait_until
from tests.webhook_support import SECRET

TOPIC = {"topic": "tides"}
PRIVATE = "http://10.1.2.3/hook"


def create(api, body: dict, chain: str = "demo"):
    return api.post(f"/api/v1/chains/{chain}/schedules", body)


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code and body["status"] == status
    return body


def fields(response) -> set[str]:
    return {e["field"] for e in problem(response, 400, "validation_error")["errors"]}


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def delete(api, path: str):
    return api.client.delete(path, headers=api._headers(None))


def due_now(schedule_id, ago: timedelta = timedelta(0)) -> datetime:
    """Make the schedule's tick due (`ago` in the past); returns the due time."""
    due = timezone.now() - ago
    Schedule.objects.filter(pk=schedule_id).update(next_run_at=due)
    return due


# --- The API ------------------------------------------------------------------------------------


def test_a_cron_schedule_ticks_on_its_time_zones_clock(alice, make_chain):
    make_chain("demo")
    before = timezone.now()
    response = create(
        alice,
        {
            "cron": "0  9 * * *",
            "timezone": "Europe/Paris",
            "input": TOPIC,
            "metadata": {"source": "cron"},
            "webhook": {"url": "https://hooks.example.com/x", "secret": SECRET},
        },
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert response["Location"] == f"/api/v1/schedules/{body['schedule_id']}"
    assert body["cron"] == "0 9 * * *" and body["timezone"] == "Europe/Paris"
    assert body["interval_s"] is None and body["version"] is None and body["chain"] == "demo"
    assert body["input"] == TOPIC and body["metadata"] == {"source": "cron"}
    assert body["webhook"] == {
        "url": "https://hooks.example.com/x",
        "events": ["run.completed", "run.failed", "run.cancelled", "run.timed_out"],
    }
    assert "secret" not in json.dumps(body)
    assert body["paused"] is False and body["last_error"] is None and body["last_run_id"] is None
    assert body["runs_url"] == f"/api/v1/runs?schedule={body['schedule_id']}"
    next_run = when(body["next_run_at"])
    paris = next_run.astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute, paris.second) == (9, 0, 0)
    assert before < next_run <= before + timedelta(hours=25)
    assert alice.get(f"/api/v1/schedules/{body['schedule_id']}").json() == body


def test_an_interval_schedule_ticks_one_interval_after_creation(alice, make_chain):
    make_chain("demo")
    before = timezone.now()
    body = create(alice, {"interval_s": 3600, "input": TOPIC, "version": 1}).json()
    assert body["interval_s"] == 3600 and body["cron"] is None and body["timezone"] is None
    assert body["version"] == 1 and body["webhook"] is None
    next_run = when(body["next_run_at"])
    assert before + timedelta(seconds=3600) <= next_run <= timezone.now() + timedelta(seconds=3600)


# fmt: off
BAD = [
    ({"cron": "61 * * * *"}, {"cron"}),
    ({"cron": "*/15 * * *"}, {"cron"}),
    ({"cron": "0 */15 * * * *"}, {"cron"}),  # seconds: five fields only
    ({"cron": "0 0 31 2 *"}, {"cron"}),  # never
    ({"cron": "*/0 * * * *"}, {"cron"}),
    ({"cron": ""}, {"cron"}),
    ({"cron": 15}, {"cron"}),
    ({"cron": "*/15 * * * *", "timezone": "Mars/Olympus_Mons"}, {"timezone"}),
    ({"cron": "*/15 * * * *", "timezone": "../../etc/passwd"}, {"timezone"}),
    ({"cron": "*/15 * * * *", "timezone": ""}, {"timezone"}),
    ({"cron": "*/15 * * * *", "timezone": 2}, {"timezone"}),
    ({"cron": "nope", "timezone": "Nowhere/Town"}, {"cron", "timezone"}),
    ({"cron": "*/15 * * * *", "interval_s": 3600}, {"cron", "interval_s"}),
    ({}, {"cron", "interval_s"}),
    ({"interval_s": 59}, {"interval_s"}),
    ({"interval_s": 0}, {"interval_s"}),
    ({"interval_s": "3600"}, {"interval_s"}),
    ({"interval_s": 2**31}, {"interval_s"}),
    ({"interval_s": 3600, "timezone": "UTC"}, {"timezone"}),
    ({"interval_s": 3600, "input": {"topic": ""}}, {"input.topic"}),
    ({"interval_s": 3600, "input": {}}, {"input.topic"}),
    ({"interval_s": 3600, "input": ["tides"]}, {"input"}),
    ({"interval_s": 3600, "metadata": {"k": [1]}}, {"metadata"}),
    ({"interval_s": 3600, "webhook": {"url": PRIVATE, "secret": SECRET}}, {"webhook.url"}),
    ({"interval_s": 3600, "webhook": {"url": "https://a.example.com/", "secret": "s"}}, {"webhook.secret"}),  # noqa: E501
    ({"interval_s": 3600, "version": 0}, {"version"}),
    ({"interval_s": 3600, "every": "hour"}, {"every"}),
]
# fmt: on


@pytest.mark.parametrize(("body", "named"), BAD, ids=[json.dumps(b) for b, _ in BAD])
def test_an_invalid_schedule_is_a_400_naming_the_field(alice, make_chain, body, named):
    make_chain("demo")
    body = {"input": TOPIC, **body}
    assert fields(create(alice, body)) == named
    assert not Schedule.objects.exists()


def test_other_refusals_of_a_create(alice, make_chain):
    make_chain("demo")
    problem(create(alice, {"interval_s": 3600, "input": TOPIC}, chain="nope"), 404, "not_found")
    missing = problem(
        create(alice, {"interval_s": 3600, "input": TOPIC, "version": 7}), 404, "not_found"
    )
    assert "no version 7" in missing["detail"]
    raw = alice.post("/api/v1/chains/demo/schedules", raw=b"{not json")
    assert fields(raw) == {"body"}
    problem(
        alice.post("/api/v1/chains/demo/schedules", raw=b"x", content_type="text/plain"),
        415,
        "unsupported_media_type",
    )
    problem(Api(None).post("/api/v1/chains/demo/schedules", {}), 401, "authentication_failed")
    assert not Schedule.objects.exists()


def test_the_minimum_interval_is_a_setting(alice, make_chain, settings):
    make_chain("demo")
    settings.SCHEDULE_MIN_INTERVAL_S = 600
    errors = problem(create(alice, {"interval_s": 599, "input": TOPIC}), 400, "validation_error")
    assert errors["errors"] == [{"field": "interval_s", "message": "Must be at least 600 seconds."}]
    assert create(alice, {"interval_s": 600, "input": TOPIC}).status_code == 201


def test_list_is_the_owners_newest_first_and_paginated(alice, bob, make_chain):
    make_chain("demo")
    made = [create(alice, {"interval_s": 60 * (i + 1), "input": TOPIC}).json() for i in range(3)]
    create(bob, {"interval_s": 60, "input": TOPIC})
    first = alice.get("/api/v1/schedules", {"limit": 2}).json()
    assert [s["schedule_id"] for s in first["results"]] == [
        made[2]["schedule_id"],
        made[1]["schedule_id"],
    ]
    second = alice.client.get(first["next"], headers=alice._headers(None)).json()
    assert [s["schedule_id"] for s in second["results"]] == [made[0]["schedule_id"]]
    assert second["next"] is None
    assert fields(alice.get("/api/v1/schedules", {"cursor": "!!"})) == {"cursor"}
    assert fields(alice.get("/api/v1/schedules", {"limit": 0})) == {"limit"}
    assert fields(alice.get("/api/v1/schedules", {"chain": "demo"})) == {"chain"}


def test_pause_resume_and_delete(alice, make_chain):
    make_chain("demo")
    schedule = create(alice, {"cron": "*/15 * * * *", "input": TOPIC}).json()
    url = f"/api/v1/schedules/{schedule['schedule_id']}"
    paused = alice.post(f"{url}/pause")
    assert paused.status_code == 200
    assert paused.json()["paused"] is True and paused.json()["next_run_at"] is None
    assert alice.post(f"{url}/pause").json() == paused.json()  # idempotent
    # While paused nothing ticks.
    assert schedules_fire_due(now=timezone.now() + timedelta(days=1))["started"] == 0
    resumed = alice.post(f"{url}/resume").json()
    assert resumed["paused"] is False
    next_run = when(resumed["next_run_at"])
    assert next_run.minute % 15 == 0 and next_run.second == 0
    assert timezone.now() < next_run <= timezone.now() + timedelta(minutes=15)
    assert alice.post(f"{url}/resume").json() == resumed
    problem(
        alice.client.patch(
            url, "{}", content_type="application/json", headers=alice._headers(None)
        ),
        405,
        "method_not_allowed",
    )
    problem(alice.get(url, {"x": 1}), 400, "validation_error")
    assert delete(alice, url).status_code == 204
    problem(alice.get(url), 404, "not_found")
    problem(delete(alice, url), 404, "not_found")
    problem(alice.post(f"{url}/pause"), 404, "not_found")


def test_bob_cannot_see_pause_resume_or_delete_alices_schedules(alice, bob, make_chain):
    make_chain("demo")
    schedule = create(alice, {"interval_s": 3600, "input": TOPIC}).json()
    schedule_id = schedule["schedule_id"]
    Schedule.objects.filter(pk=schedule_id).update(next_run_at=timezone.now())
    schedule_tick(schedule_id=uuid.UUID(schedule_id), due=Schedule.objects.get().next_run_at)
    before = list(Schedule.objects.values())
    url = f"/api/v1/schedules/{schedule_id}"
    missing = f"/api/v1/schedules/{uuid.uuid4()}"
    for path in (url, missing):
        problem(bob.get(path), 404, "not_found")
        problem(bob.post(f"{path}/pause"), 404, "not_found")
        problem(bob.post(f"{path}/resume"), 404, "not_found")
        problem(delete(bob, path), 404, "not_found")
    assert bob.get("/api/v1/schedules").json() == {"results": [], "next": None}
    assert bob.get("/api/v1/runs", {"schedule": schedule_id}).json()["results"] == []
    assert list(Schedule.objects.values()) == before
    assert len(alice.get("/api/v1/runs", {"schedule": schedule_id}).json()["results"]) == 1


# --- Ticks --------------------------------------------------------------------------------------


def test_a_tick_starts_an_ordinary_run_that_lists_by_schedule(alice, make_chain):
    chain = make_chain("demo")
    made = create(alice, {"interval_s": 600, "input": TOPIC, "metadata": {"n": 1}}).json()
    other = create(alice, {"interval_s": 600, "input": {"topic": "other"}}).json()
    run_create(api_key=alice.key, chain=chain, run_input=TOPIC, metadata={})
    due = due_now(made["schedule_id"], ago=timedelta(seconds=5))
    now = timezone.now()
    assert schedules_fire_due(now=now) == {"started": 1, "refused": 0, "taken": 0}

    run = Run.objects.get(schedule_id=made["schedule_id"])
    assert run.status == RunStatus.QUEUED and run.api_key_id == alice.key.pk
    assert run.input == TOPIC and run.metadata == {"n": 1}
    shown = alice.get(f"/api/v1/runs/{run.id}").json()
    assert shown["schedule_id"] == made["schedule_id"]
    listed = alice.get("/api/v1/runs", {"schedule": made["schedule_id"]}).json()["results"]
    assert [r["run_id"] for r in listed] == [str(run.id)]
    assert alice.get("/api/v1/runs", {"schedule": other["schedule_id"]}).json()["results"] == []
    # Runs not started by a schedule say so.
    assert {r["schedule_id"] for r in alice.get("/api/v1/runs").json()["results"]} == {
        None,
        made["schedule_id"],
    }
    sid = made["schedule_id"]
    for bad in ("not-a-uuid", "", sid.replace("-", ""), f"{{{sid}}}", f"urn:uuid:{sid}"):
        assert fields(alice.get("/api/v1/runs", {"schedule": bad})) == {"schedule"}
    upper = alice.get("/api/v1/runs", {"schedule": made["schedule_id"].upper()}).json()
    assert [r["run_id"] for r in upper["results"]] == [str(run.id)]

    after = alice.get(f"/api/v1/schedules/{made['schedule_id']}").json()
    assert after["last_run_id"] == str(run.id)
    assert when(after["last_run_at"]) == now.replace(microsecond=now.microsecond // 1000 * 1000)
    next_run = Schedule.objects.get(pk=made["schedule_id"]).next_run_at
    assert now < next_run <= now + timedelta(seconds=600)
    assert (next_run - due) % timedelta(seconds=600) == timedelta(0)
    # Deleted, its runs still list by its id.
    delete(alice, f"/api/v1/schedules/{made['schedule_id']}")
    assert len(alice.get("/api/v1/runs", {"schedule": made["schedule_id"]}).json()["results"]) == 1


def test_a_scheduled_runs_webhook_and_pinned_version_are_the_schedules(alice, make_chain):
    make_chain("demo")
    schedule = create(
        alice,
        {
            "interval_s": 600,
            "version": 1,
            "input": TOPIC,
            "webhook": {"url": "https://hooks.example.com/s", "secret": SECRET},
        },
    ).json()
    make_chain("demo", description="a second version")  # published after: not the one run
    due_now(schedule["schedule_id"])
    schedules_fire_due()
    run = Run.objects.select_related("chain").get(schedule_id=schedule["schedule_id"])
    assert run.chain.version == 1
    assert run.webhook_url == "https://hooks.example.com/s" and run.webhook_secret == SECRET


@pytest.mark.parametrize(
    ("timing", "missed"),
    [
        ({"interval_s": 60}, timedelta(minutes=10, seconds=30)),
        ({"cron": "*/15 * * * *"}, timedelta(hours=3)),
    ],
)
def test_ticks_missed_while_nothing_ran_run_once(alice, make_chain, timing, missed):
    make_chain("demo")
    schedule = create(alice, {**timing, "input": TOPIC}).json()
    due = due_now(schedule["schedule_id"], ago=missed)
    now = timezone.now()
    assert schedules_fire_due(now=now)["started"] == 1
    assert schedules_fire_due(now=now)["started"] == 0
    assert Run.objects.filter(schedule_id=schedule["schedule_id"]).count() == 1
    next_run = Schedule.objects.get().next_run_at
    if "interval_s" in timing:
        # The next tick of the same series, the first one after now.
        assert now < next_run <= now + timedelta(seconds=60)
        assert (next_run - due) % timedelta(seconds=60) == timedelta(0)
    else:
        assert now < next_run <= now + timedelta(minutes=15) and next_run.minute % 15 == 0


def test_a_refused_tick_is_recorded_and_not_retried(alice, make_chain):
    chain = make_chain("demo")
    alice.key.max_active_runs = 1
    alice.key.save()
    busy = run_create(api_key=alice.key, chain=chain, run_input=TOPIC, metadata={})
    schedule = create(alice, {"interval_s": 60, "input": TOPIC}).json()
    due = due_now(schedule["schedule_id"])
    now = timezone.now()
    assert schedules_fire_due(now=now) == {"started": 0, "refused": 1, "taken": 0}
    assert not Run.objects.filter(schedule_id=schedule["schedule_id"]).exists()
    shown = alice.get(f"/api/v1/schedules/{schedule['schedule_id']}").json()
    assert shown["last_error"]["code"] == "concurrency_limit"
    assert shown["last_error"]["message"] and when(shown["last_error"]["at"]) <= timezone.now()
    assert shown["last_run_id"] is None
    assert Schedule.objects.get().next_run_at == due + timedelta(seconds=60)
    # Not tried again in a loop: the same tick is gone, the next one is at its time.
    assert schedules_fire_due(now=now + timedelta(seconds=30))["refused"] == 0

    run_cancel(run=busy, reason="api")
    assert schedules_fire_due(now=now + timedelta(seconds=61))["started"] == 1
    shown = alice.get(f"/api/v1/schedules/{schedule['schedule_id']}").json()
    assert shown["last_error"] is None and shown["last_run_id"]


def test_ticks_of_a_chain_gone_or_a_revoked_key_are_refused(alice, make_chain):
    make_chain("demo")
    pinned = create(alice, {"interval_s": 60, "input": TOPIC, "version": 1}).json()
    latest = create(alice, {"interval_s": 60, "input": TOPIC}).json()
    Chain.objects.filter(name="demo", version=1).update(published=False)
    make_chain("demo")  # v2: the other schedule's chain
    due_now(pinned["schedule_id"])
    assert schedules_fire_due() == {"started": 0, "refused": 1, "taken": 0}
    gone = Schedule.objects.get(pk=pinned["schedule_id"])
    assert (gone.last_error_code, gone.last_error) == (
        "not_found",
        "Chain 'demo' has no version 1.",
    )

    api_key_revoke(key=alice.key)
    due_now(latest["schedule_id"])
    assert schedules_fire_due() == {"started": 0, "refused": 1, "taken": 0}
    revoked = Schedule.objects.get(pk=latest["schedule_id"])
    assert revoked.last_error_code == "authentication_failed"
    assert not Run.objects.exists()


def test_a_tick_whose_input_no_longer_fits_the_chain_is_refused(alice, make_chain):
    make_chain("demo")
    schedule = create(alice, {"interval_s": 60, "input": TOPIC}).json()
    make_chain("demo", schema={"type": "object", "required": ["text"]})
    due_now(schedule["schedule_id"])
    assert schedules_fire_due()["refused"] == 1
    shown = Schedule.objects.get()
    assert shown.last_error_code == "validation_error" and shown.last_error_at


@pytest.mark.django_db(transaction=True)
def test_a_tick_fired_by_many_at_once_starts_one_run(alice, make_chain):
    """Four connections fire the same ticks at the same instant (each read them due): every
    tick starts exactly one run."""
    make_chain("demo")
    ids = [
        create(alice, {"interval_s": 60, "input": TOPIC}).json()["schedule_id"] for _ in range(6)
    ]
    dues = {schedule_id: due_now(schedule_id) for schedule_id in ids}
    barrier = threading.Barrier(4)
    results: list[str] = []
    errors: list[BaseException] = []

    def fire() -> None:
        try:
            barrier.wait()
            for schedule_id, due in dues.items():
                results.append(schedule_tick(schedule_id=uuid.UUID(schedule_id), due=due))
        except BaseException as e:
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=fire) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == sorted(["started"] * 6 + ["taken"] * 18)
    for schedule_id in ids:
        assert Run.objects.filter(schedule_id=schedule_id).count() == 1


# --- The executors' clock, in real executor processes --------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_executors_fire_each_tick_once_and_a_restart_runs_missed_ticks_once(
    alice, make_chain, executors
):
    make_chain("demo")
    ids = [
        create(alice, {"interval_s": 3600, "input": TOPIC}).json()["schedule_id"] for _ in range(10)
    ]
    first, second = executors(SCHEDULE_POLL_S="0.05"), executors(SCHEDULE_POLL_S="0.05")
    for schedule_id in ids:
        due_now(schedule_id)

    def fired() -> bool:
        return not Schedule.objects.filter(next_run_at__lte=timezone.now()).exists()

    def ended() -> bool:
        return not Run.objects.filter(status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).exists()

    wait_until(fired, 30, message="both executors' clocks to fire the ticks")
    assert [Run.objects.filter(schedule_id=i).count() for i in ids] == [1] * 10
    wait_until(ended, 30, message="the scheduled runs to end")
    assert set(Run.objects.values_list("status", flat=True)) == {RunStatus.COMPLETED}
    assert "schedules: started=" in first.output() + second.output()

    # Everything down for three hours: the first executor back fires each schedule once.
    first.kill()
    second.kill()
    for schedule_id in ids:
        due_now(schedule_id, ago=timedelta(hours=3))
    executors(SCHEDULE_POLL_S="0.05")
    wait_until(fired, 30, message="the restarted executor's clock")
    assert [Run.objects.filter(schedule_id=i).count() for i in ids] == [2] * 10
    soon = timezone.now() + timedelta(minutes=59)
    assert all(s.next_run_at > soon for s in Schedule.objects.all())
    wait_until(ended, 30, message="the scheduled runs to end")
