"""The operators' console: each action as staff through the test client, refused for others,
and changelists whose query count does not grow with the rows shown."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from agentsvc.models import ApiKey
from agentsvc.services import api_key_create
from runs.execution.executor import run_execute
from runs.models import Chain, Run, RunStatus
from runs.services import run_create
from schedules.models import Schedule
from schedules.services import schedule_create
from tests.conftest import Api, fake
from webhooks.models import WebhookDelivery, WebhookEndpoint, WebhookMessage
from webhooks.services.deliveries import endpoint_disable_automatically

RUNS = "/admin/runs/run/"
KEYS = "/admin/agentsvc/apikey/"
CHAINS = "/admin/runs/chain/"


@pytest.fixture
def staff(db) -> Client:
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    client.user = user
    return client


@pytest.fixture
def visitor(db) -> Client:
    """Logged in, but not staff."""
    user = get_user_model().objects.create_user("visitor", "v@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def start(api, chain, **kwargs) -> Run:
    return run_create(
        api_key=api.key, chain=chain, run_input={"topic": "tides"}, metadata={"m": 1}, **kwargs
    )


def hidden_inputs(page: str) -> dict[str, str]:
    """The form's hidden inputs (inline management forms), as a browser would post them."""
    found = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page)
    return {name: html.unescape(value) for name, value in found if name != "csrfmiddlewaretoken"}


def logged(obj, fragment: str) -> bool:
    return any(
        fragment in entry.get_change_message()
        for entry in LogEntry.objects.filter(object_id=str(obj.pk))
    )


# --- Runs ---------------------------------------------------------------------------------


def test_run_list_filters_and_search(staff, alice, bob, make_chain):
    demo, other = make_chain("demo"), make_chain("other")
    a1, a2, b1 = start(alice, demo), start(alice, other), start(bob, demo)
    run_execute(run_id=str(a1.id))
    page = staff.get(RUNS).content.decode()
    assert all(str(r.id)[:8] in page for r in (a1, a2, b1))
    assert "completed" in page and "alice" in page and "demo v1" in page

    def shown(**params) -> set[str]:
        page = staff.get(RUNS, params).content.decode()
        return {str(r.id)[:8] for r in (a1, a2, b1) if str(r.id)[:8] in page}

    short = lambda *runs: {str(r.id)[:8] for r in runs}  # noqa: E731
    assert shown(status__exact="completed") == short(a1)
    assert shown(chain__name="other") == short(a2)
    assert shown(owner__id__exact=bob.key.owner_id) == short(b1)
    assert shown(q=str(b1.id)) == short(b1)
    assert shown(q="not-a-uuid") == set()
    assert len(shown(created_at__gte="2000-01-01 00:00:00+00:00")) == 3


def found(client: Client, path: str, **params) -> set:
    """The primary keys of the changelist's rows."""
    response = client.get(path, params)
    assert response.status_code == 200
    return {obj.pk for obj in response.context["cl"].result_list}


def test_run_search_by_id_and_by_api_key_prefix_or_name(
    staff, alice, bob, make_chain, django_assert_max_num_queries
):
    batch, batch_raw = api_key_create(owner_name="alice", name="nightly-batch")
    chain = make_chain("demo")
    a1, b1 = start(alice, chain), start(bob, chain)
    a2 = run_create(api_key=batch, chain=chain, run_input={"topic": "x"}, metadata={})
    a3 = run_create(api_key=batch, chain=chain, run_input={"topic": "y"}, metadata={})
    run_execute(run_id=str(a3.id))

    assert found(staff, RUNS, q=str(b1.id)) == {b1.pk}
    assert found(staff, RUNS, q=f"  {str(a2.id).upper()} ") == {a2.pk}
    # The key as the admin shows it, its prefix alone, the whole key, its name: only its runs,
    # not the other runs of the same owner.
    for term in (f"ak_{batch.prefix}…", batch.prefix, batch_raw, "nightly-batch", "NIGHTLY-batch"):
        assert found(staff, RUNS, q=term) == {a2.pk, a3.pk}, term
    assert found(staff, RUNS, q="alice-key") == {a1.pk}
    assert found(staff, RUNS, q=f"ak_{batch.prefix}", status__exact="completed") == {a3.pk}
    assert found(staff, RUNS, status__exact="queued") == {a1.pk, a2.pk, b1.pk}
    for term in ("nightly", batch.prefix[:5], str(a1.id)[:8], "no such key"):
        assert found(staff, RUNS, q=term) == set(), term
    page = staff.get(RUNS, {"q": batch.prefix}).content.decode()
    assert f"nightly-batch (ak_{batch.prefix}…)" in page  # the key column
    with django_assert_max_num_queries(8):
        assert staff.get(RUNS, {"q": batch.prefix}).status_code == 200
    with django_assert_max_num_queries(8):
        assert staff.get(RUNS, {"q": str(b1.id)}).status_code == 200


def test_run_page_shows_event_log_and_deliveries(staff, alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=3)])
    hook = "https://hooks.example.com/in"
    run = start(alice, chain, webhook={"url": hook})
    run_execute(run_id=str(run.id))
    page = staff.get(f"{RUNS}{run.id}/change/").content.decode()
    log = page[page.index('id="events-group"') :]
    types = re.findall(r"(run\.queued|run\.started|agent\.started|run\.completed)", log)
    assert types[0] == "run.queued" and types[-1] == "run.completed"  # newest last
    assert hook in page and "/admin/webhooks/webhookdelivery/" in page
    assert "tides" in page  # the input
    assert run.webhook_secret == "" or run.webhook_secret not in page


def test_cancel_selected_runs(staff, alice, make_chain):
    chain = make_chain("demo")
    queued, done = start(alice, chain), start(alice, chain)
    run_execute(run_id=str(done.id))
    response = staff.post(
        RUNS,
        {"action": "cancel_selected", "_selected_action": [str(queued.id), str(done.id)]},
        follow=True,
    )
    assert "1 run(s) cancelled" in response.content.decode()
    queued.refresh_from_db()
    assert queued.status == RunStatus.CANCELLED and queued.cancel_reason == "admin"
    assert Run.objects.get(pk=done.id).status == RunStatus.COMPLETED
    assert logged(queued, "Cancelled")
    # The API shows what the operator did.
    assert alice.get(f"/api/v1/runs/{queued.id}").json()["status"] == "cancelled"


def test_rerun_starts_a_new_run_with_the_same_input_and_key(staff, alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=2)])
    original = start(alice, chain)
    run_execute(run_id=str(original.id))
    response = staff.post(
        RUNS, {"action": "rerun", "_selected_action": [str(original.id)]}, follow=True
    )
    new = Run.objects.exclude(pk=original.id).get()
    assert "re-run as" in response.content.decode()
    assert (new.input, new.metadata, new.api_key_id, new.chain_id) == (
        original.input,
        original.metadata,
        alice.key.pk,
        chain.pk,
    )
    assert new.status == RunStatus.QUEUED and logged(original, str(new.id))
    # It is alice's run, visible to her through the API, as a rerun of the original.
    shown = alice.get(f"/api/v1/runs/{new.id}")
    assert shown.status_code == 200 and shown.json()["rerun_of"] == str(original.id)


def test_rerun_with_a_revoked_key_is_refused(staff, alice, make_chain):
    original = start(alice, make_chain("demo"))
    ApiKey.objects.filter(pk=alice.key.pk).update(revoked_at="2020-01-01T00:00:00Z")
    response = staff.post(
        RUNS, {"action": "rerun", "_selected_action": [str(original.id)]}, follow=True
    )
    assert "revoked" in response.content.decode()
    assert Run.objects.count() == 1


def test_non_staff_are_sent_to_login(visitor, alice, make_chain):
    run = start(alice, make_chain("demo"))
    for path in (RUNS, f"{RUNS}{run.id}/change/", KEYS, CHAINS, f"{KEYS}add/"):
        response = visitor.get(path)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    response = visitor.post(RUNS, {"action": "cancel_selected", "_selected_action": [run.id]})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Run.objects.get(pk=run.id).status == RunStatus.QUEUED
    anonymous = Client().get(RUNS)
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]


def test_run_changelist_queries_do_not_grow_with_rows(
    staff, alice, bob, make_chain, django_assert_max_num_queries
):
    chains = [make_chain(f"c{i}") for i in range(3)]
    for i in range(30):
        start(alice if i % 2 else bob, chains[i % 3])
    with django_assert_max_num_queries(8):
        assert staff.get(RUNS).status_code == 200
    with django_assert_max_num_queries(8):
        assert staff.get(RUNS, {"status__exact": "queued"}).status_code == 200


# --- API keys -------------------------------------------------------------------------------


def test_create_key_shows_it_once_and_it_works(staff, make_chain):
    response = staff.post(
        f"{KEYS}add/", {"owner_name": "carol", "name": "ci", "runs_per_minute": "7"}
    )
    assert response.status_code == 302
    page = staff.get(response["Location"]).content.decode()
    raw = re.search(r"(ak_[A-Za-z0-9_\-]{40,})", page).group(1)
    # The message that carried it stayed on the server (the session), not in a cookie, where it
    # would travel signed and compressed but readable.
    assert "messages" not in response.cookies
    key = ApiKey.objects.get(owner__name="carol")
    assert key.runs_per_minute == 7 and key.key_hash not in page
    assert Api(raw).get("/api/v1/runs").status_code == 200
    # Never again: the key's page shows the prefix only.
    again = staff.get(f"{KEYS}{key.pk}/change/").content.decode()
    assert raw not in again and key.key_hash not in again and f"ak_{key.prefix}" in again
    assert LogEntry.objects.filter(object_id=str(key.pk)).exists()


def test_revoke_and_edit_limits(staff, alice):
    response = staff.post(
        f"{KEYS}{alice.key.pk}/change/",
        {"name": "renamed", "max_active_runs": "3", "tokens_per_minute": "5000"},
        follow=True,
    )
    assert response.status_code == 200
    alice.key.refresh_from_db()
    assert (alice.key.name, alice.key.max_active_runs, alice.key.tokens_per_minute) == (
        "renamed",
        3,
        5000,
    )
    staff.post(KEYS, {"action": "revoke", "_selected_action": [alice.key.pk]})
    assert alice.get("/api/v1/runs").status_code == 401
    assert logged(alice.key, "Revoked")


def test_key_and_chain_changelists_query_counts(staff, make_chain, django_assert_max_num_queries):
    for i in range(25):
        api_key_create(owner_name=f"owner{i}", name=f"k{i}")
    for i in range(5):
        make_chain(f"chain{i}")
    with django_assert_max_num_queries(8):
        page = staff.get(KEYS).content.decode()
    assert "ak_" in page and "key_hash" not in page
    with django_assert_max_num_queries(8):
        assert staff.get(CHAINS).status_code == 200


# --- Chains ---------------------------------------------------------------------------------


def _definition(page: str) -> dict:
    raw = re.search(r'<textarea name="definition"[^>]*>(.*?)</textarea>', page, re.S).group(1)
    return json.loads(html.unescape(raw))


def test_editing_a_chain_publishes_a_new_version(staff, alice, make_chain):
    v1 = make_chain("demo", models=[fake(tokens=2)])
    run = start(alice, v1)
    page = staff.get(f"{CHAINS}{v1.pk}/change/").content.decode()
    assert "agent0" in page and "v1" in page
    definition = _definition(page)
    definition["agents"][0]["max_tokens"] = 77
    response = staff.post(
        f"{CHAINS}{v1.pk}/change/",
        {"definition": json.dumps(definition), **hidden_inputs(page)},
        follow=True,
    )
    assert "Published demo v2" in response.content.decode()
    v2 = Chain.objects.get(name="demo", version=2)
    assert v2.agents.get().max_tokens == 77
    assert Chain.objects.get(pk=v1.pk).agents.get().max_tokens != 77  # v1 untouched
    assert Run.objects.get(pk=run.id).chain_id == v1.pk
    assert logged(v2, "Published v2")
    # The API now serves v2.
    assert alice.get("/api/v1/chains/demo").json()["version"] == 2


def test_bad_definition_is_a_form_error_and_publishes_nothing(staff, make_chain):
    v1 = make_chain("demo")
    page = staff.get(f"{CHAINS}{v1.pk}/change/").content.decode()
    definition = _definition(page)
    definition["timeout_s"] = 0
    response = staff.post(
        f"{CHAINS}{v1.pk}/change/",
        {"definition": json.dumps(definition), **hidden_inputs(page)},
    )
    assert response.status_code == 200 and "timeout_s must be" in response.content.decode()
    assert Chain.objects.filter(name="demo").count() == 1


def test_add_a_chain(staff, fake_model):
    definition = {
        "name": "fresh",
        "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "{{ input }}"}],
    }
    response = staff.post(f"{CHAINS}add/", {"definition": json.dumps(definition)}, follow=True)
    assert response.status_code == 200
    assert Chain.objects.get(name="fresh").version == 1


# --- Webhook endpoints and deliveries ---------------------------------------------------------

ENDPOINTS = "/admin/webhooks/webhookendpoint/"


def _failed_delivery(run, endpoint, created_at, seq: int) -> WebhookDelivery:
    message = WebhookMessage.objects.create(
        id=WebhookMessage.new_id(),
        run=run,
        event_type="run.completed",
        seq=seq,
        payload={},
        created_at=created_at,
    )
    delivery = WebhookDelivery.objects.create(
        message=message, endpoint=endpoint, url=endpoint.url, status="failed", attempt_count=8
    )
    WebhookDelivery.objects.filter(pk=delivery.pk).update(created_at=created_at)
    return delivery


def test_endpoint_disable_enable_and_resend_failed_in_range(staff, alice, make_chain, local_ok):
    endpoint = WebhookEndpoint.objects.create(
        owner=alice.key.owner, url="http://127.0.0.1:9/hook", secret="s", events=["run.completed"]
    )
    staff.post(ENDPOINTS, {"action": "disable", "_selected_action": [endpoint.pk]})
    endpoint.refresh_from_db()
    assert not endpoint.enabled and endpoint.disabled_reason == "admin"
    staff.post(ENDPOINTS, {"action": "enable", "_selected_action": [endpoint.pk]})
    endpoint.refresh_from_db()
    assert endpoint.enabled and endpoint.disabled_reason == ""
    assert logged(endpoint, "Disabled") and logged(endpoint, "Enabled")

    run = start(alice, make_chain("demo"))
    now = timezone.now()
    recent = _failed_delivery(run, endpoint, now - timedelta(hours=2), 10)
    old = _failed_delivery(run, endpoint, now - timedelta(days=3), 11)
    response = staff.post(
        ENDPOINTS,
        {
            "action": "resend_failed",
            "_selected_action": [endpoint.pk],
            "since": (now - timedelta(hours=5)).strftime("%Y-%m-%d %H:%M:%S"),
            "until": "",
        },
        follow=True,
    )
    assert "1 failed delivery(ies) queued for resend" in response.content.decode()
    recent.refresh_from_db()
    old.refresh_from_db()
    assert (recent.status, recent.next_trigger) == ("pending", "manual")
    assert old.status == "failed"


def test_delivery_changelist_query_count(
    staff, alice, make_chain, local_ok, django_assert_max_num_queries
):
    endpoint = WebhookEndpoint.objects.create(
        owner=alice.key.owner, url="http://127.0.0.1:9/hook", secret="s", events=["run.completed"]
    )
    run = start(alice, make_chain("demo"))
    for i in range(20):
        _failed_delivery(run, endpoint, timezone.now(), 10 + i)
    with django_assert_max_num_queries(8):
        assert staff.get("/admin/webhooks/webhookdelivery/").status_code == 200
    with django_assert_max_num_queries(8):
        assert staff.get(ENDPOINTS).status_code == 200


def test_delivery_search_by_delivery_id_webhook_id_run_id_and_url(
    staff, alice, make_chain, local_ok, django_assert_max_num_queries
):
    chain = make_chain("demo")
    first, second = start(alice, chain), start(alice, chain)
    hooks = [
        WebhookEndpoint.objects.create(
            owner=alice.key.owner, url=url, secret="s", events=["run.completed"]
        )
        for url in ("https://a.example.com/in", "https://b.example.com/other")
    ]
    # The first run's message goes to both endpoints, the second's to one.
    d1 = _failed_delivery(first, hooks[0], timezone.now(), 10)
    d2 = WebhookDelivery.objects.create(
        message=d1.message, endpoint=hooks[1], url=hooks[1].url, status="failed"
    )
    d3 = _failed_delivery(second, hooks[0], timezone.now(), 10)
    deliveries = "/admin/webhooks/webhookdelivery/"

    assert found(staff, deliveries, q=str(d2.pk)) == {d2.pk}
    assert found(staff, deliveries, q=d3.message_id) == {d3.pk}  # the webhook-id header
    assert found(staff, deliveries, q=f" {d1.message_id} ") == {d1.pk, d2.pk}
    assert found(staff, deliveries, q=str(second.id)) == {d3.pk}
    assert found(staff, deliveries, q="b.example.com") == {d2.pk}
    assert found(staff, deliveries, q="msg_" + "0" * 32) == set()
    assert found(staff, deliveries, q=str(d1.pk)[:8]) == set()
    with django_assert_max_num_queries(8):
        assert staff.get(deliveries, {"q": d1.message_id}).status_code == 200
    with django_assert_max_num_queries(8):
        assert staff.get(deliveries, {"q": str(d2.pk)}).status_code == 200


def test_an_endpoint_disabled_automatically_shows_in_the_endpoint_list(staff, alice, local_ok):
    endpoint = WebhookEndpoint.objects.create(
        owner=alice.key.owner, url="https://a.example.com/in", secret="s", events=["run.completed"]
    )
    endpoint_disable_automatically(
        endpoint_id=endpoint.pk,
        reason="Failing for too long without a success.",
        now=timezone.now(),
    )
    page = staff.get(ENDPOINTS, {"enabled__exact": "0"})
    row = re.search(r"<tr[^>]*>.*?a\.example\.com/in.*?</tr>", page.content.decode(), re.S)
    assert row and "Failing for too long without a success." in row.group(0)
    endpoint.refresh_from_db()
    assert endpoint.disabled_at is not None


# --- Schedules ------------------------------------------------------------------------------

SCHEDULES = "/admin/schedules/schedule/"


def _schedule(api, chain, **timing) -> Schedule:
    return schedule_create(
        api_key=api.key,
        chain_name=chain.name,
        version=None,
        cron=timing.get("cron", ""),
        tz=timing.get("tz", "UTC"),
        interval_s=timing.get("interval_s"),
        run_input={"topic": "tides"},
        metadata={},
        webhook={"url": "https://hooks.example.com/s", "secret": "whsec_c2VjcmV0"},
    )


def test_schedules_list_pause_resume_and_delete(
    staff, alice, bob, make_chain, django_assert_max_num_queries
):
    chain = make_chain("demo")
    hourly = _schedule(alice, chain, interval_s=3600)
    parisian = _schedule(bob, chain, cron="0 9 * * 1-5", tz="Europe/Paris")
    for _ in range(10):
        _schedule(alice, chain, interval_s=60)
    with django_assert_max_num_queries(8):
        page = staff.get(SCHEDULES).content.decode()
    assert "every 3600 s" in page and "0 9 * * 1-5 (Europe/Paris)" in page
    assert (
        "whsec_" not in page
        and "whsec_" not in staff.get(f"{SCHEDULES}{parisian.pk}/change/").content.decode()
    )

    staff.post(SCHEDULES, {"action": "pause", "_selected_action": [hourly.pk]})
    hourly.refresh_from_db()
    assert hourly.paused and hourly.next_run_at is None
    staff.post(SCHEDULES, {"action": "resume", "_selected_action": [hourly.pk]})
    hourly.refresh_from_db()
    assert not hourly.paused and hourly.next_run_at > timezone.now()
    assert logged(hourly, "Paused") and logged(hourly, "Resumed")

    response = staff.post(
        SCHEDULES, {"action": "delete_selected", "_selected_action": [parisian.pk], "post": "yes"}
    )
    assert response.status_code == 302
    assert not Schedule.objects.filter(pk=parisian.pk).exists()
    assert staff.get(f"{SCHEDULES}add/").status_code == 403
