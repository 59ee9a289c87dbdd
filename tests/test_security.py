"""Security properties that are not one endpoint's behaviour: API keys checked by prefix and a
constant-time compare, the admin closed to everyone but staff, CSRF on every admin action, and
no secret in any log of a representative flow."""

from __future__ import annotations

import hmac
import json
import logging
import re
import subprocess
import sys
import uuid

import httpx
import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from websockets.sync.client import connect

from agentsvc.models import ApiKey, hash_key
from runs.models import Chain, Run, RunStatus
from runs.services import run_create
from schedules.models import Schedule
from schedules.services import schedule_create
from tests.conftest import Api, Proc, fake, process_env, start_web, wait_until
from tests.test_ws import frames_until_close
from tests.webhook_support import SECRET, deliver_all, finished_run, hook_path
from webhooks.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint

# --- API keys ---------------------------------------------------------------------------------


def test_a_key_is_found_by_its_prefix_and_compared_in_constant_time(alice, monkeypatch):
    """Why this is timing-safe: the database is asked for keys by their public 8-character
    prefix only (an index lookup whose timing says nothing about the secret part), and the
    SHA-256 of the presented key is compared with each candidate's by hmac.compare_digest."""
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    key = ApiKey.objects.get(pk=alice.key.pk)
    wrong = alice.raw_key[:11] + ("A" if alice.raw_key[11] != "A" else "B") + alice.raw_key[12:]
    with CaptureQueriesContext(connection) as queries:
        response = Api(wrong).get("/api/v1/runs")
    assert response.status_code == 401
    lookups = [q["sql"] for q in queries if 'FROM "agentsvc_apikey"' in q["sql"]]
    assert len(lookups) == 1 and '"agentsvc_apikey"."prefix" =' in lookups[0], lookups
    assert "key_hash" not in lookups[0].split("WHERE", 1)[1]
    assert compared and all(key.key_hash in pair for pair in compared)

    compared.clear()
    assert alice.get("/api/v1/runs").status_code == 200
    assert compared, "the right key is compared too"


def test_keys_sharing_a_prefix_are_told_apart(alice, bob):
    """Prefixes are not unique: every key with the presented prefix is compared."""
    twin = "ak_" + alice.key.prefix + "t" * 35
    ApiKey.objects.create(
        owner=bob.key.owner, name="twin", prefix=alice.key.prefix, key_hash=hash_key(twin)
    )
    assert alice.get("/api/v1/runs").status_code == 200
    run = Api(twin).post("/api/v1/chains/nothing/runs", {})  # authenticated: the chain is unknown
    assert run.status_code == 404
    wrong = "ak_" + alice.key.prefix + "x" * 35
    assert Api(wrong).get("/api/v1/runs").status_code == 401


# --- The admin: staff only, and CSRF on every write ---------------------------------------

# Pages only staff may open. New consoles go here (one line each).
STAFF_ONLY = ["/admin/", "/dashboard/", "/dashboard/state", "/dashboard/series"]


def _admin_pages(objects: dict) -> list[str]:
    """Every changelist, add and change page of every registered model."""
    pages = list(STAFF_ONLY)
    for model in admin.site._registry:
        base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        pages += [base, f"{base}add/"]
        obj = objects.get(model)
        if obj is not None:
            pages.append(f"{base}{obj.pk}/change/")
    return pages


@pytest.fixture
def admin_objects(alice, make_chain, receiver, local_ok) -> dict:
    """One object of each model the admin shows, and the run's delivery."""
    url = receiver.base_url + hook_path()
    endpoint = WebhookEndpoint.objects.create(
        owner=alice.key.owner, url=url, secret=SECRET, events=["run.completed"]
    )
    run = finished_run(alice, make_chain)
    deliver_all()
    WebhookDelivery.objects.update(status=DeliveryStatus.FAILED)
    queued = run_create(api_key=alice.key, chain=run.chain, run_input={"topic": "a"}, metadata={})
    schedule = schedule_create(
        api_key=alice.key,
        chain_name=run.chain.name,
        version=None,
        cron="*/15 * * * *",
        tz="Europe/Paris",
        interval_s=None,
        run_input={"topic": "s"},
        metadata={},
        webhook={"url": url, "secret": SECRET},
    )
    return {
        Run: queued,
        Schedule: schedule,
        ApiKey: alice.key,
        Chain: run.chain,
        WebhookEndpoint: endpoint,
        WebhookDelivery: WebhookDelivery.objects.get(),
        type(alice.key.owner): alice.key.owner,
    }


def test_admin_refuses_everyone_but_staff(alice, admin_objects):
    user = get_user_model().objects.create_user("visitor", "v@example.com", "pw")
    visitor = Client()
    visitor.force_login(user)
    with_key = Client(headers={"Authorization": f"Bearer {alice.raw_key}"})
    for page in _admin_pages(admin_objects):
        for who, client in (("anonymous", Client()), ("non-staff", visitor), ("key", with_key)):
            response = client.get(page)
            assert response.status_code == 302, (who, page, response.status_code)
            assert response["Location"].startswith("/admin/login/"), (who, page)


def test_a_staff_session_does_not_authenticate_the_api(db):
    """The API trusts keys only, so a browser's admin cookie cannot be ridden (no CSRF there)."""
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("ops", "o@example.com", "pw"))
    assert staff.get("/api/v1/runs").status_code == 401
    assert (
        staff.post("/api/v1/webhook-endpoints", {}, content_type="application/json").status_code
        == 401
    )


def _revoked(objects) -> bool:
    return ApiKey.objects.get(pk=objects[ApiKey].pk).revoked_at is not None


# Every admin write: (what, url, form data, has it happened?).
ADMIN_WRITES = [
    (
        "cancel runs",
        "/admin/runs/run/",
        lambda o: {"action": "cancel_selected", "_selected_action": [str(o[Run].pk)]},
        lambda o: Run.objects.get(pk=o[Run].pk).status == RunStatus.CANCELLED,
    ),
    (
        "re-run",
        "/admin/runs/run/",
        lambda o: {"action": "rerun", "_selected_action": [str(o[Run].pk)]},
        lambda o: Run.objects.count() == 3,
    ),
    (
        "revoke keys",
        "/admin/agentsvc/apikey/",
        lambda o: {"action": "revoke", "_selected_action": [o[ApiKey].pk]},
        _revoked,
    ),
    (
        "create a key",
        "/admin/agentsvc/apikey/add/",
        lambda o: {"owner_name": "mallory", "name": "stolen"},
        lambda o: ApiKey.objects.filter(name="stolen").exists(),
    ),
    (
        "edit key limits",
        "/admin/agentsvc/apikey/{ApiKey}/change/",
        lambda o: {"name": "renamed", "max_active_runs": "1"},
        lambda o: ApiKey.objects.get(pk=o[ApiKey].pk).name == "renamed",
    ),
    (
        "disable endpoints",
        "/admin/webhooks/webhookendpoint/",
        lambda o: {"action": "disable", "_selected_action": [str(o[WebhookEndpoint].pk)]},
        lambda o: not WebhookEndpoint.objects.get().enabled,
    ),
    (
        "resend failed deliveries",
        "/admin/webhooks/webhookendpoint/",
        lambda o: {
            "action": "resend_failed",
            "_selected_action": [str(o[WebhookEndpoint].pk)],
            "since": "",
            "until": "",
        },
        lambda o: WebhookDelivery.objects.get().status == DeliveryStatus.PENDING,
    ),
    (
        "resend deliveries",
        "/admin/webhooks/webhookdelivery/",
        lambda o: {"action": "resend", "_selected_action": [str(o[WebhookDelivery].pk)]},
        lambda o: WebhookDelivery.objects.get().status == DeliveryStatus.PENDING,
    ),
    (
        "delete an endpoint",
        "/admin/webhooks/webhookendpoint/{WebhookEndpoint}/delete/",
        lambda o: {"post": "yes"},
        lambda o: not WebhookEndpoint.objects.exists(),
    ),
    (
        "cancel a run from the dashboard",
        "/dashboard/runs/{Run}/cancel",
        lambda o: {},
        lambda o: Run.objects.get(pk=o[Run].pk).status == RunStatus.CANCELLED,
    ),
    (
        "publish a chain version",
        "/admin/runs/chain/{Chain}/change/",
        lambda o: {
            "definition": json.dumps(
                {
                    "name": o[Chain].name,
                    "timeout_s": 31,
                    "agents": [
                        {"name": "a", "provider": "local", "model": fake(), "prompt": "{{ input }}"}
                    ],
                }
            )
        },
        lambda o: Chain.objects.filter(name=o[Chain].name).count() == 2,
    ),
]


def _url(template: str, objects: dict) -> str:
    return template.format(**{model.__name__: obj.pk for model, obj in objects.items()})


@pytest.mark.parametrize("what,url,data,happened", ADMIN_WRITES, ids=[w[0] for w in ADMIN_WRITES])
def test_admin_writes_need_the_csrf_token(admin_objects, what, url, data, happened):
    user = get_user_model().objects.create_superuser("ops", "o@example.com", "pw")
    staff = Client(enforce_csrf_checks=True)
    staff.force_login(user)
    url = _url(url, admin_objects)
    form = data(admin_objects)

    refused = staff.post(url, form)
    assert refused.status_code == 403, (what, refused.status_code)
    assert not happened(admin_objects), what
    # A forged token is refused as well.
    staff.cookies["csrftoken"] = "x" * 32
    assert staff.post(url, {**form, "csrfmiddlewaretoken": "y" * 32}).status_code == 403
    assert not happened(admin_objects), what

    # With the token the page hands out, the same post does it (so the 403 was the CSRF check).
    page = staff.get("/dashboard/" if url.startswith("/dashboard/") else url)
    assert page.status_code == 200, what
    token = staff.cookies["csrftoken"].value
    done = staff.post(url, {**form, "csrfmiddlewaretoken": token})
    assert done.status_code in (200, 302), (what, done.status_code)
    assert happened(admin_objects), what


# --- No secrets in logs -------------------------------------------------------------------------

RAW_KEY = re.compile(r"ak_[A-Za-z0-9_-]{12,}")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_no_secret_reaches_a_log(alice, make_chain, receiver, local_ok, caplog, tmp_path, capsys):
    """A representative flow with every logger at DEBUG, in this process and in a web server
    and an executor of its own: keys made three ways, runs and endpoints with signing secrets,
    deliveries, resends, rotation, streams, and failed authentications."""
    for name in ["", *logging.root.manager.loggerDict]:
        caplog.set_level(logging.DEBUG, logger=name)
    provider_key = "sk-provider-" + uuid.uuid4().hex
    env = process_env(
        LOG_LEVEL="DEBUG",
        LOCAL_MODEL_API_KEY=provider_key,
        Q_CLUSTER_NAME=f"agentsvc-test-logs-{uuid.uuid4().hex[:8]}",
    )
    worker = Proc([sys.executable, "manage.py", "executor"], env, tmp_path / "worker.log")
    web, url = start_web(env, tmp_path / "web.log")
    secrets = {alice.raw_key, provider_key, SECRET}
    try:
        make_chain("demo", models=[fake(tokens=3)])
        # Keys: the service (alice), the command, the admin.
        call_command("createapikey", "ops-cli", "--owner", "ops")
        secrets.add(capsys.readouterr().out.strip())
        staff = Client()
        staff.force_login(get_user_model().objects.create_superuser("ops", "o@example.com", "pw"))
        added = staff.post("/admin/agentsvc/apikey/add/", {"owner_name": "ops", "name": "ui"})
        page = staff.get(added["Location"]).content.decode()
        secrets.add(RAW_KEY.search(page).group(0))

        auth = {"Authorization": f"Bearer {alice.raw_key}"}
        with httpx.Client(base_url=url, timeout=30) as http:
            made = http.post(
                "/api/v1/webhook-endpoints",
                json={"url": receiver.base_url + hook_path()},
                headers=auth,
            ).json()
            secrets.add(made["secret"])
            rotated = http.post(
                f"/api/v1/webhook-endpoints/{made['id']}/rotate-secret", headers=auth
            )
            secrets.add(rotated.json()["secret"])
            failing = http.post(
                "/api/v1/webhook-endpoints",
                json={"url": receiver.base_url + hook_path(status=500)},
                headers={"X-API-Key": alice.raw_key, "Idempotency-Key": "logs-1"},
            ).json()
            secrets.add(failing["secret"])
            run_id = http.post(
                "/api/v1/chains/demo/runs",
                json={
                    "input": {"topic": "tides"},
                    "webhook": {"url": receiver.base_url + hook_path(), "secret": SECRET},
                },
                headers=auth,
            ).json()["run_id"]
            wait_until(
                lambda: (
                    http.get(f"/api/v1/runs/{run_id}", headers=auth).json()["status"] == "completed"
                ),
                30,
            )
            with http.stream(
                "GET",
                f"/api/v1/runs/{run_id}/events",
                headers={**auth, "Accept": "text/event-stream"},
            ) as stream:
                stream.read()
            ws = url.replace("http://", "ws://")
            with connect(f"{ws}/ws/v1/runs/{run_id}", additional_headers=auth) as sock:
                assert frames_until_close(sock)[1] == 1000
            wait_until(
                lambda: (
                    not WebhookDelivery.objects.filter(
                        status=DeliveryStatus.PENDING, attempt_count=0
                    ).exists()
                ),
                30,
            )
            deliveries = http.get(f"/api/v1/runs/{run_id}/deliveries", headers=auth).json()
            for delivery in deliveries["results"]:
                http.post(f"/api/v1/deliveries/{delivery['id']}/resend", headers=auth)
            # Failed authentications, with keys that look real.
            for wrong in (alice.raw_key[:-4] + "AAAA", "ak_" + "Z" * 43):
                secrets.add(wrong)
                assert (
                    http.get(
                        "/api/v1/runs", headers={"Authorization": f"Bearer {wrong}"}
                    ).status_code
                    == 401
                )
                assert http.get("/api/v1/runs", headers={"X-API-Key": wrong}).status_code == 401
                with connect(f"{ws}/ws/v1/runs", additional_headers={"X-API-Key": wrong}) as sock:
                    assert frames_until_close(sock)[1] == 4401
        # In this process too: a run with a webhook, its deliveries, a failed authentication
        # (the executor stopped first: its pump would claim the deliveries).
        worker.stop()
        finished_run(
            alice, make_chain, webhook={"url": receiver.base_url + hook_path(), "secret": SECRET}
        )
        deliver_all()
        assert Api("ak_" + "Q" * 43).get("/api/v1/runs").status_code == 401
    finally:
        web.stop()
        worker.stop()
    # The test's own WebSocket client logs the URL it opens, key and all: not the server's doing.
    server_side = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    logs = {
        "this process": "\n".join(caplog.handler.format(r) for r in server_side),
        "web": web.output(),
        "worker": worker.output(),
    }
    assert "DEBUG" in logs["web"] and "DEBUG" in logs["worker"] and "DEBUG" in logs["this process"]
    assert "/api/v1/webhook-endpoints" in logs["web"]  # requests are logged, just not secrets
    for where, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a secret in the {where} log"
        assert not RAW_KEY.search(text), (where, RAW_KEY.search(text).group(0))
        for marker in ("whsec_", "Bearer ak_"):
            at = text.find(marker)
            assert at < 0, (where, text[max(0, at - 300) : at + 100])


# --- Headers on pages for people, and settings for TLS deployments --------------------------


def _directives(policy: str) -> dict[str, str]:
    return dict(part.strip().partition(" ")[::2] for part in policy.split(";") if part.strip())


def test_admin_and_dashboard_pages_carry_a_content_security_policy(admin_objects):
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("ops", "o@example.com", "pw"))
    for page in [*_admin_pages(admin_objects), "/admin/login/"]:
        client = staff if page != "/admin/login/" else Client()
        response = client.get(page)
        assert response.status_code in (200, 403), page  # 403: models nobody may add
        policy = _directives(response["Content-Security-Policy"])
        assert policy["default-src"] == policy["script-src"] == "'self'", page
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'", page
        # The admin's templates set style attributes; the dashboard needs no inline style.
        styles = "'self'" if page.startswith("/dashboard/") else "'self' 'unsafe-inline'"
        assert policy["style-src"] == styles, page
        # No script the policy would block: every one comes from a file, no handler inline.
        if response["Content-Type"].startswith("text/html"):
            html = response.content.decode()
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page
            assert not re.search(r"\son[a-z]+=", html), page
            assert "javascript:" not in html, page
    dashboard = staff.get("/dashboard/").content.decode()
    assert "<style" not in dashboard and " style=" not in dashboard
    # The API and the problem pages are not HTML for people: no policy needed there.
    assert "Content-Security-Policy" not in Client().get("/healthz")


@pytest.mark.slow
def test_the_api_docs_page_carries_a_content_security_policy(live_server_url):
    """A probe found none on /api/docs (the admin and dashboard had one). Swagger UI's start-up
    script is a file of its own, so the policy allows no inline script there either."""
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        page = http.get("/api/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = _directives(page.headers["content-security-policy"])
        assert policy["default-src"] == policy["script-src"] == "'self'"
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
        assert not re.search(r"\son[a-z]+=", html) and "javascript:" not in html
        # Every script and style it loads is served from this origin, the start-up script too.
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert any("script" in s for s in sources), sources
        for source in sources:
            assert source.startswith("/"), source
            asset = http.get(source.replace("&amp;", "&"))
            assert asset.status_code == 200, source
        script = http.get("/api/docs?script=")
        assert script.headers["content-type"].startswith("application/javascript")
        assert "SwaggerUIBundle" in script.text and "/api/v1/schema" in script.text


def _settings_in_a_child(**env: str) -> subprocess.CompletedProcess:
    """Start-up as a process would do it: settings read from this environment."""
    code = (
        "import django, json; django.setup(); from django.conf import settings as s; "
        "print(json.dumps({n: getattr(s, n) for n in ("
        "'SECURE_HSTS_SECONDS', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
        "'READYZ_DETAIL_NETWORKS', 'WEBHOOK_ALLOWED_NETWORKS', 'SERVICE_PORTS', "
        "'STREAM_TICKET_TTL_S')}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env=process_env(DJANGO_SETTINGS_MODULE="agentsvc.settings", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tls_settings_and_strict_parsing_of_the_new_variables():
    done = _settings_in_a_child(
        SECURE_HSTS_SECONDS="31536000",
        SECURE_COOKIES="true",
        METRICS_TOKEN="t",
        WEBHOOK_ALLOWED_NETWORKS="10.20.0.0/16:443,[fd00::/8]:8443,10.30.0.0/16",
        SERVICE_PORTS="8000,8001",
        STREAM_TICKET_TTL_S="120",
    )
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout.strip().splitlines()[-1])
    assert values["SECURE_HSTS_SECONDS"] == 31536000
    assert values["SESSION_COOKIE_SECURE"] is values["CSRF_COOKIE_SECURE"] is True
    assert values["READYZ_DETAIL_NETWORKS"] == []  # a token set: the token is the only way
    assert values["SERVICE_PORTS"] == [8000, 8001] and values["STREAM_TICKET_TTL_S"] == 120
    defaults = json.loads(
        _settings_in_a_child(METRICS_TOKEN="", SECURE_HSTS_SECONDS="").stdout.splitlines()[-1]
    )
    assert defaults["SECURE_HSTS_SECONDS"] == 0 and defaults["STREAM_TICKET_TTL_S"] == 300
    assert defaults["READYZ_DETAIL_NETWORKS"] == ["127.0.0.0/8", "::1/128"]
    for name, bad in [
        ("SECURE_HSTS_SECONDS", "a year"),
        ("SECURE_HSTS_SECONDS", "-1"),
        ("WEBHOOK_ALLOWED_NETWORKS", "fd00::/8:443"),
        ("SERVICE_PORTS", "80,http"),
        ("READYZ_DETAIL_NETWORKS", "loopback"),
        ("STREAM_TICKET_TTL_S", "5m"),
    ]:
        failed = _settings_in_a_child(**{name: bad})
        assert failed.returncode != 0, (name, bad)
        assert "ImproperlyConfigured" in failed.stderr and name in failed.stderr, failed.stderr


def test_hsts_on_https_answers(db, settings):
    settings.SECURE_HSTS_SECONDS = 3600
    response = Client().get("/healthz", secure=True)
    assert response["Strict-Transport-Security"] == "max-age=3600"
    assert "Strict-Transport-Security" not in Client().get("/healthz")
