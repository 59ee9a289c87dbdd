"""Runs that wait for a person: each way to ask, through the real executor (in-process), the
answer endpoint and its errors, expiry, cancel, and what a waiting run holds."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from agentsvc.models import ApiKey, TokenWindow
from runs import keeper
from runs.chains import ChainDefinitionError, chain_publish
from runs.models import Run, RunEvent, RunStatus, RunStep
from runs.services import run_cancel, run_create
from tests.chaincode import tools as chain_tools
from tests.conftest import fake
from tests.test_auth import assert_problem
from tests.test_code_chains import local_fake  # noqa: F401 - a fixture
from tests.test_engine import execute

CITY = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}


def file_chain(fake_model, name: str = "approved", **agent) -> object:
    """One agent (the fake echoes its prompt) with what it asks a person first."""
    chain, _ = chain_publish(
        definition={
            "name": name,
            "timeout_s": 60,
            "input_schema": {"type": "object", "required": ["topic"]},
            "agents": [
                {
                    "name": "writer",
                    "provider": "local",
                    "model": agent.pop("model", fake(tokens=5)),
                    "base_url": fake_model.base_url,
                    "prompt": agent.pop("prompt", "Write on {{ input.topic }}"),
                    **agent,
                }
            ],
        }
    )
    return chain


def start(api, chain, topic: str = "tides") -> Run:
    return run_create(api_key=api.key, chain=chain, run_input={"topic": topic}, metadata={})


def types(run: Run) -> list[str]:
    return list(RunEvent.objects.filter(run=run).order_by("seq").values_list("type", flat=True))


def typed(run: Run, kind: str) -> list[dict]:
    return [e.data for e in RunEvent.objects.filter(run=run, type=kind).order_by("seq")]


def answer(api, run: Run, body: dict, **headers):
    return api.post(f"/api/v1/runs/{run.id}/input", body, headers=headers or None)


def request_of(api, run: Run) -> dict:
    body = api.get(f"/api/v1/runs/{run.id}").json()
    assert body["status"] == "input_required", body
    return body["input_request"]


# --- A file agent's approval ------------------------------------------------------------------


def test_approval_before_an_agent_waits_then_resumes(alice, fake_model):
    chain = file_chain(fake_model, approval={"prompt": "Publish on {{ input.topic }}?"})
    run = execute(start(alice, chain))
    assert run.status == RunStatus.INPUT_REQUIRED
    assert run.worker == "" and run.current_agent == "writer"
    assert types(run) == ["run.queued", "run.started", "run.input_required"]
    (asked,) = typed(run, "run.input_required")
    request = request_of(alice, run)
    assert request["prompt"] == asked["prompt"] == "Publish on tides?"
    assert request["kind"] == asked["kind"] == "approval" and request["agent"] == "writer"
    assert request["request_id"] == asked["request_id"]
    assert request["expires_at"] == asked["expires_at"]
    assert "key" not in request and "schema" not in request

    response = answer(alice, run, {"request_id": request["request_id"], "approve": True})
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "queued" and response.json()["input_request"] is None
    run = execute(run)
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert types(run)[3:7] == ["run.input_received", "run.queued", "run.started", "run.resumed"]
    assert typed(run, "run.input_received")[0]["by"] == f"ak_{alice.key.prefix}"
    assert typed(run, "run.queued")[1]["reason"] == "input_received"
    assert typed(run, "run.resumed")[0]["index"] == 0
    assert types(run).count("agent.started") == 1
    step = RunStep.objects.get(run=run, key="a0/approval")
    assert step.data["approve"] is True and step.data["request_id"] == request["request_id"]


def test_refused_approval_fails_the_run(alice, fake_model):
    model = fake(tokens=5)
    chain = file_chain(fake_model, model=model, approval={"prompt": "Go?"})
    run = execute(start(alice, chain))
    request = request_of(alice, run)
    assert answer(alice, run, {"request_id": request["request_id"], "approve": False}).status_code
    run = execute(run)
    assert run.status == RunStatus.FAILED
    assert run.error_code == "input_refused"
    assert f"ak_{alice.key.prefix}" in run.error_message
    assert "agent.started" not in types(run)
    assert model not in fake_model.bodies  # the agent never called its model


# --- A file agent's question ------------------------------------------------------------------


def test_ask_validates_the_answer_and_gives_it_to_the_prompt(alice, fake_model):
    model = fake(tokens=40)
    chain = file_chain(
        fake_model,
        model=model,
        prompt="Write on {{ input.topic }} for {{ answers.writer.city }}",
        ask={"prompt": "Which city wants {{ input.topic }}?", "schema": CITY},
    )
    run = execute(start(alice, chain))
    request = request_of(alice, run)
    assert request["kind"] == "input" and request["schema"] == CITY
    assert request["prompt"] == "Which city wants tides?"
    rid = request["request_id"]
    refused = assert_problem(
        answer(alice, run, {"request_id": rid, "input": {"city": 7}}), 400, "validation_error"
    )
    assert refused["errors"][0]["field"] == "input.city"
    missing = assert_problem(
        answer(alice, run, {"request_id": rid, "input": {}}), 400, "validation_error"
    )
    assert missing["errors"][0]["field"] == "input.city"
    wrong_kind = answer(alice, run, {"request_id": rid, "approve": True})
    assert assert_problem(wrong_kind, 400, "validation_error")["errors"][0]["field"] == "input"
    assert Run.objects.get(pk=run.pk).status == RunStatus.INPUT_REQUIRED  # nothing was taken

    assert answer(alice, run, {"request_id": rid, "input": {"city": "Brest"}}).status_code == 202
    run = execute(run)
    assert run.status == RunStatus.COMPLETED, run.error_message
    prompt = fake_model.bodies[model]["messages"][-1]["content"]
    assert prompt == "Write on tides for Brest"


def test_definitions_refuse_bad_waits(db, fake_model):
    bad = [
        {"approval": "yes"},
        {"approval": {"prompt": ""}},
        {"approval": {"prompt": "ok", "schema": {}}},
        {"ask": {"prompt": "x", "schema": {"type": "string"}}},
        {"ask": {"prompt": "x", "schema": {"type": "object", "required": 3}}},
        {"ask": {"prompt": "{% if %}"}},
        {"approval": {"prompt": "a"}, "ask": {"prompt": "b"}},
    ]
    for i, extra in enumerate(bad):
        with pytest.raises(ChainDefinitionError):
            file_chain(fake_model, name=f"bad-{i}", **extra)
    with pytest.raises(ChainDefinitionError, match="input_timeout_s"):
        chain_publish(
            definition={
                "name": "bad-timeout",
                "input_timeout_s": 0,
                "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "p"}],
            }
        )


def test_a_chain_without_waits_keeps_its_hash(db):
    """Publishing an unchanged older definition adds no version: the new fields are only in the
    definition when given."""
    definition = {
        "name": "plain",
        "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "p"}],
    }
    first, _ = chain_publish(definition=definition)
    again, created = chain_publish(definition=definition)
    assert not created and again.pk == first.pk
    assert first.input_timeout_s == 86400


# --- A tool that needs approval ---------------------------------------------------------------


def tool_chain(fake_model, model: str, name: str = "mailer") -> object:
    return file_chain(
        fake_model,
        name=name,
        model=model,
        prompt="{{ input.topic }}",
        tools=[
            {"function": "tests.chaincode.tools:send_email", "needs_approval": True},
            "tests.chaincode.tools:lookup",
        ],
    )


def test_tool_call_waits_for_approval_with_its_arguments(alice, fake_model):
    model = fake(tools=1)
    chain_tools.SENT.clear()
    run = execute(start(alice, tool_chain(fake_model, model), "bob@example.com"))
    assert run.status == RunStatus.INPUT_REQUIRED
    request = request_of(alice, run)
    (call,) = typed(run, "agent.tool_call")
    assert request["kind"] == "approval" and request["tool"] == "send_email"
    assert (
        request["arguments"]
        == call["arguments"]
        == {"to": "bob@example.com", "subject": "bob@example.com"}
    )
    assert request["call_id"] == call["call_id"]
    assert chain_tools.SENT == []  # not called before the answer
    assert answer(alice, run, {"request_id": request["request_id"], "approve": True}).status_code
    run = execute(run)
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert chain_tools.SENT == ["bob@example.com"]
    (result,) = typed(run, "agent.tool_result")
    assert result["output"] == "sent to bob@example.com"
    # The model round that asked was not made again: one call before the wait, one after.
    assert len(typed(run, "agent.tool_call")) == 1


def test_refused_tool_call_is_an_error_result_and_the_run_goes_on(alice, fake_model):
    model = fake(tools=1)
    chain_tools.SENT.clear()
    run = execute(start(alice, tool_chain(fake_model, model, "refused-mail"), "eve@example.com"))
    request = request_of(alice, run)
    answer(alice, run, {"request_id": request["request_id"], "approve": False})
    run = execute(run)
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert chain_tools.SENT == []
    (result,) = typed(run, "agent.tool_result")
    assert result["error"]["code"] == "call_refused"
    # What the model read back: the refusal.
    sent = json.loads(fake_model.bodies[model]["messages"][-1]["content"])
    assert sent["error"]["code"] == "call_refused"


# --- A code chain's ctx.ask and ctx.approve ----------------------------------------------------


def code_chain(entrypoint: str, name: str, **extra):
    chain, _ = chain_publish(
        definition={"name": name, "timeout_s": 60, "entrypoint": entrypoint, **extra}
    )
    return chain


@pytest.mark.usefixtures("local_fake")
def test_code_chain_asks_then_approves(alice):
    writer = fake(tokens=4)
    chain = code_chain("tests.chaincode.functions:asks", "asker")
    run = execute(
        run_create(api_key=alice.key, chain=chain, run_input={"model": writer}, metadata={})
    )
    first = request_of(alice, run)
    assert first["kind"] == "input" and first["agent"] is None and first["prompt"] == "Which city?"
    answer(alice, run, {"request_id": first["request_id"], "input": {"city": "Oslo"}})
    run = execute(run)
    second = request_of(alice, run)
    assert second["kind"] == "approval" and second["prompt"] == "Write about Oslo?"
    answer(alice, run, {"request_id": second["request_id"], "approve": True})
    run = execute(run)
    assert run.status == RunStatus.COMPLETED, run.error_message
    output = json.loads(run.output)
    assert output["city"] == "Oslo" and len(output["text"].split()) == 4
    keys = set(RunStep.objects.filter(run=run).values_list("key", flat=True))
    assert keys == {"c0:ask", "c1:approval", "c2:writer"}


@pytest.mark.usefixtures("local_fake")
def test_parallel_asks_are_asked_one_after_the_other(alice):
    chain = code_chain("tests.chaincode.functions:asks_twice_at_once", "two-asks")
    run = execute(run_create(api_key=alice.key, chain=chain, run_input={}, metadata={}))
    assert len(typed(run, "run.input_required")) == 1
    first = request_of(alice, run)
    answer(alice, run, {"request_id": first["request_id"], "input": {"n": 1}})
    run = execute(run)
    second = request_of(alice, run)
    assert second["prompt"] == "Second?"
    answer(alice, run, {"request_id": second["request_id"], "input": {"n": 2}})
    run = execute(run)
    assert json.loads(run.output) == {"first": {"n": 1}, "second": {"n": 2}}


@pytest.mark.usefixtures("local_fake")
def test_a_chain_catching_exceptions_still_waits(alice):
    chain = code_chain("tests.chaincode.functions:asks_and_catches", "catcher")
    run = execute(run_create(api_key=alice.key, chain=chain, run_input={}, metadata={}))
    assert run.status == RunStatus.INPUT_REQUIRED


# --- The answer endpoint's errors ------------------------------------------------------------


@pytest.fixture
def waiting(alice, fake_model):
    chain = file_chain(fake_model, name="gate", approval={"prompt": "Go?"})
    run = execute(start(alice, chain))
    return run, request_of(alice, run)["request_id"]


def test_second_answer_is_409_and_wrong_id_404(alice, waiting):
    run, rid = waiting
    assert_problem(
        answer(alice, run, {"request_id": "req_nope", "approve": True}), 404, "not_found"
    )
    assert answer(alice, run, {"request_id": rid, "approve": True}).status_code == 202
    again = assert_problem(
        answer(alice, run, {"request_id": rid, "approve": False}), 409, "input_already_received"
    )
    assert again["run_id"] == str(run.id)
    assert_problem(
        answer(alice, run, {"request_id": "req_other", "approve": True}), 409, "run_not_waiting"
    )
    assert RunEvent.objects.filter(run=run, type="run.input_received").count() == 1


def test_a_run_not_waiting_is_409(alice, fake_model):
    run = start(alice, file_chain(fake_model, name="nowait"))
    assert_problem(
        answer(alice, run, {"request_id": "req_x", "approve": True}), 409, "run_not_waiting"
    )


def test_bob_cannot_answer_alices_run(alice, bob, waiting):
    run, rid = waiting
    assert_problem(answer(bob, run, {"request_id": rid, "approve": True}), 404, "not_found")
    assert Run.objects.get(pk=run.pk).status == RunStatus.INPUT_REQUIRED
    assert_problem(bob.get(f"/api/v1/runs/{run.id}"), 404, "not_found")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"approve": True}, "request_id"),
        ({"request_id": 5, "approve": True}, "request_id"),
        ({"request_id": "r", "approve": "yes"}, "approve"),
        ({"request_id": "r", "input": [1]}, "input"),
        ({"request_id": "r", "approve": True, "extra": 1}, "extra"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(alice, waiting, body, field):
    run, _ = waiting
    refused = assert_problem(answer(alice, run, body), 400, "validation_error")
    assert refused["errors"][0]["field"] == field


def test_idempotency_key_replays_the_answer(alice, waiting):
    run, rid = waiting
    first = answer(alice, run, {"request_id": rid, "approve": True}, **{"Idempotency-Key": "a1"})
    again = answer(alice, run, {"request_id": rid, "approve": True}, **{"Idempotency-Key": "a1"})
    assert first.status_code == again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    other = answer(alice, run, {"request_id": rid, "approve": False}, **{"Idempotency-Key": "a1"})
    assert_problem(other, 422, "idempotency_key_reused")
    assert RunEvent.objects.filter(run=run, type="run.input_received").count() == 1


# --- What a waiting run holds ------------------------------------------------------------------


def test_waiting_gives_the_slot_back_and_the_answer_takes_it(alice, fake_model):
    ApiKey.objects.filter(pk=alice.key.pk).update(max_active_runs=1)
    alice.key.refresh_from_db()
    chain = file_chain(fake_model, name="slots", approval={"prompt": "Go?"})
    run = execute(start(alice, chain))
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 0
    other = start(alice, file_chain(fake_model, name="plain2"))  # the slot is free for another
    rid = request_of(alice, run)["request_id"]
    full = assert_problem(
        answer(alice, run, {"request_id": rid, "approve": True}), 429, "concurrency_limit"
    )
    assert full["violated-policies"] == ["active_runs"]
    assert Run.objects.get(pk=run.pk).status == RunStatus.INPUT_REQUIRED  # nothing recorded
    assert not RunStep.objects.filter(run=run, key="a0/approval").exists()
    execute(other)
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 0
    assert answer(alice, run, {"request_id": rid, "approve": True}).status_code == 202
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 1
    assert execute(run).status == RunStatus.COMPLETED
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 0


def test_waiting_settles_the_token_reservation(
    alice, fake_model, django_capture_on_commit_callbacks
):
    chain = file_chain(
        fake_model,
        name="tokens",
        model=fake(tools=1),
        tools=[{"function": "tests.chaincode.tools:send_email", "needs_approval": True}],
    )
    with django_capture_on_commit_callbacks(execute=True):
        run = start(alice, chain)
    reserved = run.tokens_reserved
    window = TokenWindow.objects.get(api_key=alice.key, window=run.tokens_window)
    assert window.used == reserved
    with django_capture_on_commit_callbacks(execute=True):
        run = execute(run)
    assert run.status == RunStatus.INPUT_REQUIRED
    used = run.input_tokens + run.output_tokens
    assert 0 < used < reserved
    assert run.tokens_reserved == used  # what is left to settle at the end: only what follows
    window.refresh_from_db()
    assert window.used == used


def test_cancel_while_waiting_is_at_once(alice, fake_model):
    chain = file_chain(fake_model, name="cancelled", approval={"prompt": "Go?"})
    run = execute(start(alice, chain))
    ApiKey.objects.filter(pk=alice.key.pk).update(active_runs=3)  # another key's runs, say
    response = alice.post(f"/api/v1/runs/{run.id}/cancel")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled" and response.json()["input_request"] is None
    assert types(execute(run))[-1] == "run.cancelled"
    # It held no slot while waiting: its end gives none back.
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 3
    rid = RunEvent.objects.get(run=run, type="run.input_required").data["request_id"]
    assert_problem(answer(alice, run, {"request_id": rid, "approve": True}), 409, "run_not_waiting")


def test_unanswered_request_times_out(alice, fake_model):
    chain = file_chain(fake_model, name="expiring", approval={"prompt": "Go?"})
    run = execute(start(alice, chain))
    expires_at = run.input_expires_at
    assert expires_at - timezone.now() > timedelta(hours=23)
    assert keeper.runs_expire_inputs(now=expires_at - timedelta(seconds=1)) == 0
    assert keeper.keeper_pass(now=expires_at + timedelta(seconds=1))["input_timed_out"] == 1
    run.refresh_from_db()
    assert run.status == RunStatus.TIMED_OUT and run.error_code == "input_timeout"
    (ended,) = typed(run, "run.timed_out")
    assert ended == {**ended, "timeout_s": 86400, "reason": "input_timeout"}
    assert keeper.runs_expire_inputs(now=expires_at + timedelta(seconds=2)) == 0


def test_input_timeout_s_of_the_chain_and_its_bound(alice, fake_model, settings):
    chain = file_chain(fake_model, name="short-wait", approval={"prompt": "Go?"})
    chain.input_timeout_s = 90
    chain.save()
    run = execute(start(alice, chain))
    assert round((run.input_expires_at - timezone.now()).total_seconds()) in (89, 90)
    settings.INPUT_TIMEOUT_MAX_S = 30
    other = execute(start(alice, chain, "two"))
    assert round((other.input_expires_at - timezone.now()).total_seconds()) in (29, 30)


def test_a_cancel_asked_while_running_is_not_lost_to_a_wait(alice, fake_model):
    """Asked to stop just before it stops to wait: it does not wait. Either its executor's
    cancel check stops it first, or the wait's write finds the request and leaves the run to
    the keeper's lost-run check, which ends it cancelled."""
    chain = file_chain(fake_model, name="racy", approval={"prompt": "Go?"})
    run = start(alice, chain)
    Run.objects.filter(pk=run.pk).update(cancel_requested_at=timezone.now(), cancel_reason="api")
    run = execute(run)
    assert "run.input_required" not in types(run)
    assert run.status in (RunStatus.RUNNING, RunStatus.CANCELLED)
    keeper.runs_recover_lost(now=timezone.now() + timedelta(minutes=5))
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED


def test_cancel_service_on_each_status(alice, fake_model):
    chain = file_chain(fake_model, name="each", approval={"prompt": "Go?"})
    run = execute(start(alice, chain))
    assert run_cancel(run=run, reason="admin").status == RunStatus.CANCELLED


# --- Operators -------------------------------------------------------------------------------


@pytest.fixture
def staff(db):
    from django.contrib.auth import get_user_model
    from django.test import Client

    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def logged(run: Run, fragment: str) -> bool:
    from django.contrib.admin.models import LogEntry

    entries = LogEntry.objects.filter(object_id=str(run.pk))
    return any(fragment in entry.get_change_message() for entry in entries)


def test_admin_lists_waiting_runs_by_age_and_shows_the_request(staff, alice, fake_model):
    chain = file_chain(fake_model, name="ops", approval={"prompt": "Ship {{ input.topic }}?"})
    old, new = execute(start(alice, chain, "old")), execute(start(alice, chain, "new"))
    plain = start(alice, file_chain(fake_model, name="ops-plain"))
    request = dict(old.input_request, requested_at="2026-01-01T00:00:00.000Z")
    Run.objects.filter(pk=old.pk).update(input_request=request)
    waiting = staff.get("/admin/runs/run/", {"waiting": "any"}).content.decode()
    assert str(old.id)[:8] in waiting and str(new.id)[:8] in waiting
    assert str(plain.id)[:8] not in waiting
    day = staff.get("/admin/runs/run/", {"waiting": "1d"}).content.decode()
    assert str(old.id)[:8] in day and str(new.id)[:8] not in day
    page = staff.get(f"/admin/runs/run/{new.id}/change/").content.decode()
    assert "Ship new?" in page and f"/admin/runs/run/{new.id}/answer/" in page


def test_staff_approve_refuse_and_answer(staff, alice, fake_model):
    gate = file_chain(fake_model, name="ops-gate", approval={"prompt": "Go?"})
    asks = file_chain(fake_model, name="ops-ask", ask={"prompt": "City?", "schema": CITY})
    approved, refused = execute(start(alice, gate, "a")), execute(start(alice, gate, "b"))
    asked = execute(start(alice, asks))

    answer_page = staff.get(f"/admin/runs/run/{approved.id}/answer/").content.decode()
    assert "Go?" in answer_page and 'value="yes"' in answer_page
    response = staff.post(f"/admin/runs/run/{approved.id}/answer/", {"approve": "yes"})
    assert response.status_code == 302
    received = RunEvent.objects.get(run=approved, type="run.input_received").data
    assert received["by"] == "staff:ops"
    assert logged(approved, "Answered")

    changelist = "/admin/runs/run/"
    staff.post(changelist, {"action": "refuse_selected", "_selected_action": [refused.pk]})
    refused = execute(refused)
    assert refused.status == RunStatus.FAILED and refused.error_code == "input_refused"
    assert "staff:ops" in refused.error_message

    bad = staff.post(f"/admin/runs/run/{asked.id}/answer/", {"input": '{"city": 3}'})
    assert bad.status_code == 200 and "input.city" in bad.content.decode()
    assert Run.objects.get(pk=asked.pk).status == RunStatus.INPUT_REQUIRED
    staff.post(f"/admin/runs/run/{asked.id}/answer/", {"input": '{"city": "Lyon"}'})
    step = RunStep.objects.get(run=asked, key="a0/ask")
    assert step.data["input"] == {"city": "Lyon"} and step.data["by"] == "staff:ops"
    assert execute(asked).status == RunStatus.COMPLETED
    gone = staff.get(f"/admin/runs/run/{asked.id}/answer/").content.decode()
    assert "waits for no answer" in gone


def test_answer_page_is_for_staff_only(alice, fake_model, db):
    from django.contrib.auth import get_user_model
    from django.test import Client

    run = execute(start(alice, file_chain(fake_model, name="ops-x", approval={"prompt": "Go?"})))
    visitor = Client()
    visitor.force_login(get_user_model().objects.create_user("v", "v@example.com", "pw"))
    response = visitor.post(f"/admin/runs/run/{run.id}/answer/", {"approve": "yes"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Run.objects.get(pk=run.pk).status == RunStatus.INPUT_REQUIRED


def test_dashboard_shows_waiting_runs_apart(staff, alice, fake_model):
    chain = file_chain(fake_model, name="dash", approval={"prompt": "Deploy {{ input.topic }}?"})
    run = execute(start(alice, chain, "prod"))
    state = staff.get("/dashboard/state").json()
    assert state["counts"]["waiting"] == 1
    (row,) = state["waiting"]
    assert row["run_id"] == str(run.id) and row["prompt"] == "Deploy prod?"
    assert row["kind"] == "approval" and row["agent"] == "writer"
    page = staff.get("/dashboard/").content.decode()
    assert '<strong id="count-waiting">1</strong>' in page and "Deploy prod?" in page


# --- Webhooks ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("local_ok")
def test_webhooks_may_subscribe_to_requests_for_input(alice, fake_model, receiver):
    from standardwebhooks import Webhook

    from tests.webhook_support import SECRET, deliver_all, hook_path
    from webhooks.services import endpoint_create

    asking, ends_only, own = hook_path(), hook_path(), hook_path()
    endpoint = endpoint_create(
        owner=alice.key.owner, url=receiver.base_url + asking, events=["run.input_required"]
    )
    endpoint_create(
        owner=alice.key.owner,
        url=receiver.base_url + ends_only,
        events=["run.completed", "run.failed", "run.cancelled", "run.timed_out"],
    )
    webhook = {"url": receiver.base_url + own, "secret": SECRET, "events": ["run.input_required"]}
    chain = file_chain(fake_model, name="hooked", approval={"prompt": "Go {{ input.topic }}?"})
    run = execute(
        run_create(
            api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={}, webhook=webhook
        )
    )
    deliver_all()
    assert receiver.requests_for(ends_only) == []
    [request] = receiver.requests_for(own)
    payload = Webhook(SECRET).verify(request.body, request.headers)
    assert payload["type"] == "run.input_required"
    data = payload["data"]
    assert data["status"] == "input_required" and data["run_id"] == str(run.id)
    assert data["input_request"]["prompt"] == "Go x?"
    assert data["input_request"]["request_id"] == request_of(alice, run)["request_id"]
    [to_endpoint] = receiver.requests_for(asking)
    verified = Webhook(endpoint.secret).verify(to_endpoint.body, to_endpoint.headers)
    assert verified["type"] == "run.input_required"
    # The endpoint API lists the event among the subscribable ones.
    listed = alice.get("/api/v1/webhook-endpoints").json()["results"]
    assert ["run.input_required"] in [e["events"] for e in listed]
    refused = alice.post(
        "/api/v1/webhook-endpoints", {"url": receiver.base_url + "/x", "events": ["run.queued"]}
    )
    assert "run.input_required" in refused.json()["errors"][0]["message"]
