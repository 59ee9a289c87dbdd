"""The operators' dashboard: staff only, its state and cancel views through the test client,
and the page itself in headless Chromium against a real daphne and worker."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from runs.models import Run, RunStatus
from runs.selectors import run_series
from runs.services import event_append, run_create
from tests.conftest import ROOT, fake, free_port, process_env, start_web, wait_until

PAGE, STATE, SERIES = "/dashboard/", "/dashboard/state", "/dashboard/series"


def cancel_url(run) -> str:
    return f"/dashboard/runs/{run.id}/cancel"


@pytest.fixture
def staff(db) -> Client:
    user = get_user_model().objects.create_user("ops", "ops@example.com", "pw", is_staff=True)
    client = Client(enforce_csrf_checks=True)
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


def start(api, chain) -> Run:
    return run_create(api_key=api.key, chain=chain, run_input={"topic": "tides"}, metadata={})


def csrf_post(client: Client, path: str):
    """A POST as the page makes it: the token from the page's form, in X-CSRFToken."""
    page = client.get(PAGE)
    token = page.context["csrf_token"]
    return client.post(path, headers={"X-CSRFToken": str(token)})


def test_page_lists_every_owners_runs_newest_first(staff, alice, bob, make_chain):
    chain = make_chain("demo")
    first, second = start(alice, chain), start(bob, chain)
    page = staff.get(PAGE)
    assert page.status_code == 200
    html = page.content.decode()
    assert html.index(str(second.id)) < html.index(str(first.id))
    assert "alice" in html and "bob" in html
    assert 'src="/static/runs/dashboard.js"' in html
    assert html.count('class="cancel"') == 2


def test_others_are_sent_to_the_admin_login(client, visitor, alice, make_chain):
    run = start(alice, make_chain("demo"))
    for who in (client, visitor):
        for method, path in (
            ("get", PAGE),
            ("get", STATE),
            ("get", SERIES),
            ("post", cancel_url(run)),
        ):
            response = getattr(who, method)(path)
            assert response.status_code == 302, (method, path)
            assert response["Location"].startswith("/admin/login/?next=")
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED


def test_static_script_is_served(live_server_url):
    response = httpx.get(f"{live_server_url}/static/runs/dashboard.js")
    assert response.status_code == 200
    assert "/ws/v1/runs" in response.text


def test_state_counts_active_queued_and_failed_in_the_last_hour(staff, alice, bob, make_chain):
    chain = make_chain("demo")
    runs = [start(api, chain) for api in (alice, alice, bob, bob, bob, alice)]
    now = timezone.now()
    Run.objects.filter(pk__in=[runs[0].pk, runs[1].pk]).update(status=RunStatus.RUNNING)
    Run.objects.filter(pk=runs[2].pk).update(status=RunStatus.FAILED, finished_at=now)
    Run.objects.filter(pk=runs[3].pk).update(
        status=RunStatus.FAILED, finished_at=now - timedelta(minutes=61)
    )
    Run.objects.filter(pk=runs[4].pk).update(status=RunStatus.TIMED_OUT, finished_at=now)
    state = staff.get(STATE).json()
    assert state["counts"] == {"active": 2, "queued": 1, "waiting": 0, "failed_last_hour": 1}
    assert [r["run_id"] for r in state["runs"]] == [str(r.id) for r in reversed(runs)]
    assert state["runs"][-1]["owner"] == "alice"
    assert state["runs"][-1]["status"] == "running"
    # The page shows the same numbers before any script runs.
    page = staff.get(PAGE).content.decode()
    assert '<strong id="count-active">2</strong>' in page
    assert '<strong id="count-failed">1</strong>' in page


def test_state_queries_do_not_grow_with_runs(staff, alice, make_chain, django_assert_num_queries):
    chain = make_chain("demo")
    for _ in range(5):
        start(alice, chain)
    staff.get(STATE)
    # session, user, three counts, the runs with their chains and owners, the waiting runs
    with django_assert_num_queries(7):
        assert len(staff.get(STATE).json()["runs"]) == 5


def test_series_counts_runs_per_minute_and_queue_waits(alice, bob, make_chain):
    chain = make_chain("demo")
    runs = [start(api, chain) for api in (alice, alice, bob, alice, bob, alice)]
    now = timezone.now()
    ago = lambda **kw: now - timedelta(**kw)  # noqa: E731

    def update(run, **fields):
        Run.objects.filter(pk=run.pk).update(**fields)

    # Two completed runs queued ten minutes ago that waited 3 and 8 s, one failed after 1 s,
    # one cancelled while queued after 4 s, one still queued for 5 minutes, one from two hours
    # ago (outside the chart).
    t10, t3, t20 = ago(minutes=10), ago(minutes=3), ago(minutes=20)
    update(runs[0], created_at=t10, started_at=t10 + timedelta(seconds=3), status="completed")
    update(runs[1], created_at=t10, started_at=t10 + timedelta(seconds=8), status="completed")
    update(runs[2], created_at=t3, started_at=t3 + timedelta(seconds=1), status="failed")
    update(runs[3], created_at=t20, finished_at=t20 + timedelta(seconds=4), status="cancelled")
    update(runs[4], created_at=ago(minutes=5))
    update(runs[5], created_at=ago(hours=2), status="completed")

    series = run_series(now=now)

    def minute(t) -> int:  # the index of t's minute; the last is now's
        floor = lambda d: d.replace(second=0, microsecond=0)  # noqa: E731
        return 59 - int((floor(now) - floor(t)).total_seconds() // 60)

    assert series["minutes"] == 60 and all(len(v) == 60 for v in series["runs"].values())
    counts = {s: {i: n for i, n in enumerate(v) if n} for s, v in series["runs"].items()}
    assert counts == {
        "queued": {minute(ago(minutes=5)): 1},
        "running": {},
        "completed": {minute(t10): 2},
        "failed": {minute(t3): 1},
        "cancelled": {minute(t20): 1},
        "timed_out": {},
        "input_required": {},
    }
    waits = {i: w for i, w in enumerate(series["queue_wait_s"]) if w is not None}
    assert waits == {
        minute(t10): 8.0,
        minute(t3): 1.0,
        minute(t20): 4.0,
        minute(ago(minutes=5)): 300.0,  # still waiting
    }
    assert series["queue_age_s"] == 300.0
    assert series["start"].endswith(":00.000Z")


def test_series_endpoint_queries_do_not_grow_with_runs(
    staff, alice, make_chain, django_assert_num_queries
):
    chain = make_chain("demo")
    for _ in range(5):
        start(alice, chain)
    staff.get(SERIES)
    # session, user, the per-minute aggregate, the oldest queued run
    with django_assert_num_queries(4):
        series = staff.get(SERIES).json()
    assert sum(series["runs"]["queued"]) == 5
    assert series["queue_age_s"] >= 0
    assert staff.get(PAGE).content.decode().count('class="chart"') == 2


def test_cancel_needs_post_and_csrf_then_cancels_and_logs(staff, alice, make_chain):
    run = start(alice, make_chain("demo"))
    assert staff.get(cancel_url(run)).status_code == 405
    assert staff.post(cancel_url(run)).status_code == 403  # no CSRF token
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED

    response = csrf_post(staff, cancel_url(run))
    assert response.status_code == 200
    assert response.json() == {
        "run_id": str(run.id),
        "status": "cancelled",
        "cancel_requested": True,
    }
    run.refresh_from_db()
    assert (run.status, run.cancel_reason) == (RunStatus.CANCELLED, "admin")
    assert run.events.filter(type="run.cancelled", data__reason="admin").exists()
    entry = LogEntry.objects.get(object_id=str(run.pk))
    assert entry.user == staff.user and "dashboard" in entry.get_change_message()


def test_cancel_a_running_run_asks_it_to_stop(staff, alice, make_chain):
    run = start(alice, make_chain("demo"))
    event_append(run_id=run.id, event="run.started", data={}, status=RunStatus.RUNNING)
    response = csrf_post(staff, cancel_url(run))
    assert response.status_code == 202 and response.json()["status"] == "running"
    assert Run.objects.get(pk=run.pk).cancel_requested_at is not None


def test_cancel_failures_are_problems(staff, alice, make_chain):
    run = start(alice, make_chain("demo"))
    event_append(run_id=run.id, event="run.completed", data={}, status=RunStatus.COMPLETED)
    response = csrf_post(staff, cancel_url(run))
    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "run_not_cancellable"
    missing = csrf_post(staff, "/dashboard/runs/00000000-0000-4000-8000-000000000000/cancel")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert not LogEntry.objects.exists()


# --- In a browser -------------------------------------------------------------------------
# Playwright's sync API keeps an event loop running in this thread, and Django then keeps
# database connections per context: everything touching the ORM happens in fixtures set up
# before the browser starts; the test itself checks through the API.

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "pw-" + "x" * 12


@pytest.fixture
def browser_setup(alice, make_chain):
    """The chains and a superuser (so the admin's run page, which needs the view permission,
    opens too)."""
    make_chain(
        "demo",
        models=[fake(tokens=30, latency_ms=50), fake(tokens=30, latency_ms=50)],
        timeout_s=60,
    )
    make_chain("brief", models=[fake(tokens=4), fake(tokens=4)])
    get_user_model().objects.create_superuser("ops", "ops@example.com", PASSWORD)
    return alice


class Web:
    """A daphne of the test's own (the browser's sockets die with it, not in a shared server),
    which can be stopped and started again on the same port."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self.starts = 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        log = self.log_dir / f"daphne-{self.starts}.log"
        self.proc, self.url = start_web(process_env(), log, port=self.port)

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def web(worker, tmp_path):
    server = Web(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def page(browser_setup, web):  # after both: no ORM call once the browser runs
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        context = browser.new_context(viewport={"width": 1400, "height": 800})
        page = context.new_page()
        page.set_default_timeout(30_000)
        # What the Content-Security-Policy blocked (Chromium reports it on the console).
        page.csp_violations = []
        page.on(
            "console",
            lambda message: (
                "Content Security Policy" in message.text
                and page.csp_violations.append(message.text)
            ),
        )
        try:
            yield page
        finally:
            page.close()
            context.close()
            browser.close()


class ApiClient:
    def __init__(self, url: str, api) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {api.raw_key}"}, timeout=30
        )

    def start(self, chain: str) -> str:
        response = self.http.post(
            f"/api/v1/chains/{chain}/runs", json={"input": {"topic": "tides"}}
        )
        assert response.status_code == 202, response.text
        return response.json()["run_id"]

    def status(self, run_id: str) -> str:
        return self.http.get(f"/api/v1/runs/{run_id}").json()["status"]

    def events(self, run_id: str) -> list[dict]:
        events, after = [], 0
        while True:
            page = self.http.get(f"/api/v1/runs/{run_id}/events", params={"after": after}).json()
            events += page["results"]
            if not page["results"]:
                return events
            after = page["next_after"]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def log_in(page, url: str) -> None:
    page.goto(f"{url}{PAGE}")
    assert "/admin/login/" in page.url  # anonymous: sent to the login form first
    page.fill("#id_username", "ops")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{url}{PAGE}")


def streamed_text(page) -> str:
    return "".join(page.locator(".agent pre").all_text_contents())


def output_text(api: ApiClient, run_id: str) -> str:
    return "".join(e["data"]["chunk"] for e in api.events(run_id) if e["event"] == "agent.output")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_dashboard_in_a_browser(browser_setup, web, page):
    web = web.url
    api = ApiClient(web, browser_setup)
    log_in(page, web)
    assert page.text_content("#count-active") == "0"
    page.wait_for_selector('#feed-state[data-state="live"]')
    # The styles come from a file, which the page's policy allows.
    assert page.evaluate("getComputedStyle(document.querySelector('main')).display") == "grid"

    # A run started through the API appears at the top, streams its tokens, and completes.
    run_id = api.start("demo")
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    row.wait_for()
    assert page.locator("#runs tbody tr").first.get_attribute("data-run-id") == run_id
    row.locator('[data-col="agents"]').click()
    page.wait_for_function(
        "() => document.querySelector('.agent[data-agent=agent0] pre')?.textContent.length > 0"
    )
    page.wait_for_selector(f'tr[data-run-id="{run_id}"][data-status="running"]')
    page.wait_for_function("() => document.getElementById('count-active').textContent === '1'")
    page.wait_for_selector(f'tr[data-run-id="{run_id}"][data-status="completed"]', timeout=60_000)
    wait_until(lambda: page.text_content("#stream-state") == "completed", 30)
    assert page.locator(".agent h3").all_text_contents() == ["agent0", "agent1"]
    assert streamed_text(page) == output_text(api, run_id)
    page.wait_for_function("() => document.getElementById('count-active').textContent === '0'")
    # The charts: one completed run this minute, a point on a 60-minute line, and its queue wait.
    completed = page.locator('#chart-runs svg path[data-series="completed"]')
    completed.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#chart-runs path[data-series=completed]')"
        "?.dataset.total === '1'"
    )
    assert completed.get_attribute("data-points") == "60"
    assert len(re.findall(r"[ML][\d.]+,[\d.]+", completed.get_attribute("d"))) == 60
    assert page.locator("#chart-runs circle.s-completed").count() == 1
    wait = page.locator('#chart-queue svg path[data-series="wait"]')
    assert len(re.findall(r"[ML][\d.]+,[\d.]+", wait.get_attribute("d"))) == 60
    assert page.locator("#chart-queue circle").count() >= 1
    assert page.text_content("#queue-age") == "0 s"

    # Another one, cancelled from the page.
    other = api.start("demo")
    page.locator(f'tr[data-run-id="{other}"] button.cancel').click()
    page.wait_for_selector(f'tr[data-run-id="{other}"][data-status="cancelled"]', timeout=60_000)
    assert api.events(other)[-1]["data"]["reason"] == "admin"
    assert page.text_content("#message") == ""

    row.locator('[data-col="agents"]').click()  # the finished run's stream, replayed
    wait_until(lambda: page.text_content("#stream-state") == "completed", 30)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # The admin's page of a short run: its whole event log fits one screenshot.
    brief = api.start("brief")
    wait_until(lambda: api.status(brief) == "completed", 30)
    page.goto(f"{web}/admin/runs/run/{brief}/change/")
    assert page.locator("#events-group").get_by_text("run.completed", exact=True).count() == 1
    page.screenshot(path=str(ARTIFACTS / "admin-run.png"), full_page=True)
    # The admin's list (filters, actions) and index work under their policy too.
    page.goto(f"{web}/admin/runs/run/")
    page.locator("#action-toggle").click()
    assert page.locator("tr.selected").count() > 0  # the admin's script ran
    page.goto(f"{web}/admin/")
    assert page.csp_violations == []


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_dashboard_reconnects_when_the_server_restarts(browser_setup, web, page):
    """Both sockets come back by themselves; the run stream resumes after the last seq shown,
    so its text has no gap and no repeat."""
    api = ApiClient(web.url, browser_setup)
    log_in(page, web.url)
    page.wait_for_selector('#feed-state[data-state="live"]')
    run_id = api.start("demo")
    page.locator(f'tr[data-run-id="{run_id}"] [data-col="agents"]').click()
    page.wait_for_function("() => document.querySelector('.agent pre')?.textContent.length > 0")

    web.stop()
    page.wait_for_selector('#feed-state[data-state="down"]')
    web.start()
    page.wait_for_selector('#feed-state[data-state="live"]', timeout=60_000)
    wait_until(lambda: page.text_content("#stream-state") == "completed", 60)
    assert streamed_text(page) == output_text(api, run_id)
    # The feed is live again: a run started now appears and finishes on the page.
    brief = api.start("brief")
    page.wait_for_selector(f'tr[data-run-id="{brief}"][data-status="completed"]', timeout=60_000)
