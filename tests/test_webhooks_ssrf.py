"""The SSRF guard at registration and at delivery: nothing private is ever connected to.

Only DNS answers are patched; the receivers are real servers on loopback.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from runs.execution.executor import run_execute
from runs.models import Run
from tests.conftest import free_port
from tests.fakes.tls import make_certificates
from tests.fakes.webhook_receiver import start_in_thread
from tests.webhook_support import SECRET, deliver_all, finished_run, hook_path
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from webhooks.services import delivery_attempt

EP = "/api/v1/webhook-endpoints"
PUBLIC = "93.184.216.34"

BLOCKED = [
    "127.0.0.1",  # loopback
    "127.255.0.9",
    "10.1.2.3",  # private
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # link-local (cloud metadata)
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "0.0.0.0",  # unspecified
    "198.18.0.1",  # benchmarking
    "::1",  # IPv6 loopback
    "::",  # unspecified
    "fe80::1",  # link-local
    "fc00::1",  # unique local
    "fd12:3456::1",
    "ff02::1",  # multicast
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2001:db8::1",  # documentation
]


def literal(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class FakeDNS:
    """Answers for names under .test, in turn (the last answer repeats); others resolve normally."""

    def __init__(self, monkeypatch) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.calls: dict[str, int] = {}
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kwargs):
        if not str(host).endswith(".test"):
            return self.real(host, port, *args, **kwargs)
        n = self.calls.get(host, 0)
        self.calls[host] = n + 1
        turns = self.answers[host]
        addresses = turns[min(n, len(turns) - 1)]
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, int(port or 0), 0, 0) if ":" in a else (a, int(port or 0)),
            )
            for a in addresses
        ]


@pytest.fixture
def dns(monkeypatch, settings):
    settings.WEBHOOK_ALLOWED_NETWORKS = []
    settings.WEBHOOK_TIMEOUT_S = 1
    return FakeDNS(monkeypatch)


@pytest.mark.parametrize("address", BLOCKED)
def test_registration_refuses_every_blocked_range(alice, make_chain, dns, address):
    url = f"http://{literal(address)}:8080/hook"
    response = alice.post(EP, {"url": url})
    assert response.status_code == 400, address
    assert [e["field"] for e in response.json()["errors"]] == ["url"]
    make_chain("demo")
    response = alice.post(
        "/api/v1/chains/demo/runs",
        {"input": {"topic": "x"}, "webhook": {"url": url, "secret": SECRET}},
    )
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == ["webhook.url"]


@pytest.mark.parametrize("url", ["http://2130706433/", "http://0x7f.1/", "http://127.1/"])
def test_registration_refuses_odd_loopback_spellings(alice, dns, url):
    assert alice.post(EP, {"url": url}).status_code == 400


def test_registration_refuses_a_name_resolving_privately(alice, dns):
    dns.answers["internal.test"] = [["10.0.0.7"]]
    response = alice.post(EP, {"url": "https://internal.test/hook"})
    assert response.status_code == 400
    assert "refused address" in response.json()["errors"][0]["message"]
    # An answer mixing public and private addresses is refused as a whole.
    dns.answers["mixed.test"] = [[PUBLIC, "127.0.0.1"]]
    assert alice.post(EP, {"url": "https://mixed.test/hook"}).status_code == 400
    assert not WebhookEndpoint.objects.exists()


@pytest.mark.parametrize("address", BLOCKED)
def test_delivery_to_a_name_that_now_resolves_privately_is_blocked(
    alice, make_chain, receiver, dns, address
):
    port = receiver.server_address[1]
    path = hook_path()
    dns.answers["hooks.test"] = [[PUBLIC], [address]]
    response = alice.post(EP, {"url": f"http://hooks.test:{port}{path}"})
    assert response.status_code == 201
    finished_run(alice, make_chain)
    deliver_all()
    assert receiver.requests_for(path) == []
    attempt = WebhookAttempt.objects.get()
    assert attempt.error == "blocked_address" and attempt.status_code is None
    assert attempt.delivery.status == "failed"


def test_dns_rebinding_cannot_reach_the_private_address(alice, make_chain, receiver, dns, settings):
    # 127.0.0.2 plays a public address; the victim on 127.0.0.1 stays private.
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.2/32"]
    public = start_in_thread(host="127.0.0.2")
    try:
        port = public.server_address[1]
        victim = start_in_thread(port=port)
        path = hook_path()
        # Registration and the delivery's one lookup see the public address; any later
        # lookup (a second resolution at connect time) would see the private one.
        dns.answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.2"], ["127.0.0.1"]]
        assert alice.post(EP, {"url": f"http://rebind.test:{port}{path}"}).status_code == 201
        finished_run(alice, make_chain)
        deliver_all()
        [request] = public.requests_for(path)
        assert request.headers["Host"] == f"rebind.test:{port}"
        assert victim.requests_for(path) == []
        assert dns.calls["rebind.test"] == 2
        victim.shutdown()
    finally:
        public.shutdown()


def test_a_run_webhook_is_checked_again_at_delivery(alice, make_chain, receiver, dns):
    port = receiver.server_address[1]
    path = hook_path()
    dns.answers["own.test"] = [[PUBLIC], ["127.0.0.1"]]
    make_chain("demo")
    hook = {"url": f"http://own.test:{port}{path}", "secret": SECRET}
    response = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}, "webhook": hook})
    assert response.status_code == 202
    run_execute(run_id=response.json()["run_id"])
    deliver_all()
    assert receiver.requests_for(path) == []
    assert WebhookAttempt.objects.get().error == "blocked_address"
    # A resend goes through the same guard.
    delivery = WebhookAttempt.objects.get().delivery
    assert alice.post(f"/api/v1/deliveries/{delivery.id}/resend").status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        f"http://{PUBLIC}/hook",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
        "http://public.test:8443/hook",
    ],
)
def test_public_addresses_are_accepted(alice, dns, url):
    dns.answers["public.test"] = [[PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]]
    response = alice.post(EP, {"url": url})
    assert response.status_code == 201, response.content
    assert response.json()["url"] == url


def test_allowed_networks_lift_the_guard(alice, dns, settings):
    settings.WEBHOOK_ALLOWED_NETWORKS = ["10.20.0.0/16"]
    assert alice.post(EP, {"url": "http://10.20.3.4/hook"}).status_code == 201
    assert alice.post(EP, {"url": "http://10.21.3.4/hook"}).status_code == 400


@pytest.mark.parametrize("cert_name, ok", [("tls.test", True), ("other.test", False)])
def test_https_keeps_the_name_for_sni_and_verification(
    alice, make_chain, dns, settings, tmp_path, cert_name, ok
):
    """We connect to the checked address, yet TLS still verifies the URL's host name."""
    ca, cert, key = make_certificates(tmp_path, cert_name)
    settings.WEBHOOK_CA_BUNDLE = str(ca)
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    server = start_in_thread(tls=(str(cert), str(key)))
    try:
        port = server.server_address[1]
        path = hook_path()
        dns.answers["tls.test"] = [["127.0.0.1"]]
        assert alice.post(EP, {"url": f"https://tls.test:{port}{path}"}).status_code == 201
        finished_run(alice, make_chain)
        delivery_attempt(delivery_id=WebhookDelivery.objects.get().id)
        attempt = WebhookAttempt.objects.get()
        if ok:
            assert attempt.status_code == 200 and attempt.error == ""
            [request] = server.requests_for(path)
            assert request.headers["Host"] == f"tls.test:{port}"
        else:
            assert attempt.status_code is None and "connection_error" in attempt.error
            assert server.requests_for(path) == []
    finally:
        server.shutdown()


# --- Ports in the allow-list, and the service's own ports -------------------------------------


def test_allowed_network_entries_can_name_a_port(alice, dns, settings):
    settings.WEBHOOK_ALLOWED_NETWORKS = ["10.20.0.0/16:443", "[fd00::/8]:8443", "10.30.0.0/16"]
    cases = {
        "https://10.20.3.4/hook": 201,  # 443 by default
        "http://10.20.3.4:443/hook": 201,
        "http://10.20.3.4/hook": 400,  # 80: not the port the entry opens
        "https://10.20.3.4:8443/hook": 400,
        "http://[fd00::1]:8443/hook": 201,
        "https://[fd00::1]/hook": 400,
        "http://10.30.1.1:9999/hook": 201,  # an entry without a port opens any port...
        "http://10.30.1.1/hook": 201,
        "http://10.30.1.1:8000/metrics": 400,  # ...but the service's own (SERVICE_PORTS)
        "http://10.30.1.1:6379/x": 400,  # and those of its Redis and PostgreSQL
        "http://10.30.1.1:5432/x": 400,
    }
    for url, status in cases.items():
        assert alice.post(EP, {"url": url}).status_code == status, url


def test_the_services_own_ports_need_an_explicit_entry(alice, make_chain, receiver, settings):
    """The probe: with 127.0.0.1/32 allowed, a tenant registered the service's /metrics and its
    Redis, and read their answers back in the delivery log."""
    port = receiver.server_address[1]
    settings.SERVICE_PORTS = [8000, port]  # the receiver plays the service itself
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.WEBHOOK_RETRY_SCHEDULE_S = [0.05]
    for url in (f"http://127.0.0.1:{port}/metrics", "http://127.0.0.1:6379/x"):
        response = alice.post(EP, {"url": url})
        assert response.status_code == 400, url
        assert "refused address" in response.json()["errors"][0]["message"]
    # Registered while its port was named, delivered after the entry lost the port: refused.
    settings.WEBHOOK_ALLOWED_NETWORKS = [f"127.0.0.1/32:{port}"]
    path = hook_path()
    assert alice.post(EP, {"url": f"http://127.0.0.1:{port}{path}"}).status_code == 201
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    finished_run(alice, make_chain)
    deliver_all()
    assert receiver.requests_for(path) == []
    assert WebhookAttempt.objects.get().error == "blocked_address"
    # Named with its port, it is delivered.
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.1/32", f"127.0.0.1/32:{port}"]
    delivery = WebhookDelivery.objects.get()
    assert alice.post(f"/api/v1/deliveries/{delivery.id}/resend").status_code == 202
    deliver_all()
    assert len(receiver.requests_for(path)) == 1


def test_answers_of_private_targets_are_for_operators_only(alice, make_chain, receiver, local_ok):
    """The deliveries API showed tenants 500 characters of an internal service's answer."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    path = hook_path()
    run = finished_run(
        alice, make_chain, webhook={"url": receiver.base_url + path, "secret": SECRET}
    )
    deliver_all()
    attempt = WebhookAttempt.objects.get()
    assert attempt.response_excerpt == "received 1" and attempt.private_target is True
    [shown] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"][0]["attempts"]
    assert shown["status_code"] == 200 and shown["response_excerpt"] == ""
    # The admin shows it.
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("ops", "o@example.com", "pw"))
    page = staff.get(f"/admin/webhooks/webhookdelivery/{attempt.delivery_id}/change/")
    assert page.status_code == 200 and b"received 1" in page.content
    # A public receiver's answer is the tenant's to see (no public receiver runs here: the
    # attempt is marked as if it had gone to one).
    WebhookAttempt.objects.update(private_target=False)
    [shown] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"][0]["attempts"]
    assert shown["response_excerpt"] == "received 1"


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_port_0_is_refused_at_registration(live_server_url, alice, make_chain):
    """A probe registered `http://127.0.0.1:0/` (201, on a server that allows loopback, as the
    test server does): read as port 80, it was retried for days. Refused, and at delivery."""
    make_chain("demo")
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    with httpx.Client(base_url=live_server_url, headers=headers, timeout=30) as http:
        for url in ("http://127.0.0.1:0/", f"http://{PUBLIC}:0/hook", "https://[::1]:00/"):
            response = http.post(EP, json={"url": url})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["errors"][0]["field"] == "url"
            assert "port" in response.json()["errors"][0]["message"]
            webhook = {"url": url, "secret": SECRET}
            response = http.post("/api/v1/chains/demo/runs", json={"input": {}, "webhook": webhook})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["errors"][0]["field"] == "webhook.url"
        # Any other port is as before.
        assert http.post(EP, json={"url": "http://127.0.0.1:1/"}).status_code == 201
    assert WebhookEndpoint.objects.count() == 1 and not Run.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_failures_of_private_targets_show_one_error_class(
    live_server_url, alice, make_chain, receiver, local_ok
):
    """A probe told open from closed ports inside an allowed network by the delivery log
    (`Connection refused` vs `http_400` vs `No route to host`). Tenants see one error class, and
    no status code or duration, for any failure at a private target; the admin keeps the
    detail."""
    local_ok.WEBHOOK_RETRY_SCHEDULE_S = []  # one attempt each
    targets = {
        "refused": f"http://127.0.0.1:{free_port()}/hook",  # nothing listens
        "http_400": receiver.base_url + hook_path(status=400),
        "http_503": receiver.base_url + hook_path(status=503),
        "redirect": receiver.base_url + hook_path(redirect=1),
    }
    for url in targets.values():
        assert alice.post(EP, {"url": url}).status_code == 201
    run = finished_run(alice, make_chain)
    deliver_all()
    details = set(WebhookAttempt.objects.values_list("error", flat=True))
    assert len(details) == 4 and "http_400" in details, details  # the operators' detail
    with httpx.Client(
        base_url=live_server_url, headers={"Authorization": f"Bearer {alice.raw_key}"}, timeout=30
    ) as http:
        deliveries = http.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
        endpoints = http.get(EP).json()["results"]
    assert {d["url"] for d in deliveries} == set(targets.values())
    for delivery in deliveries:
        [attempt] = delivery["attempts"]
        assert delivery["status"] == "failed"
        assert attempt["error"] == "private_target_error", attempt
        assert attempt["status_code"] is None and attempt["duration_ms"] is None, attempt
        assert attempt["response_excerpt"] == ""
    assert [e["last_error"] for e in endpoints] == ["private_target_error"] * 4
    # The admin shows what happened.
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("ops", "o@example.com", "pw"))
    delivery = WebhookDelivery.objects.get(url=targets["http_400"])
    page = staff.get(f"/admin/webhooks/webhookdelivery/{delivery.id}/change/")
    assert page.status_code == 200 and b"http_400" in page.content


@pytest.mark.parametrize(
    "entry, parsed",
    [
        ("10.20.0.0/16", ("10.20.0.0/16", None)),
        ("10.20.0.0/16:443", ("10.20.0.0/16", 443)),
        ("127.0.0.1:8000", ("127.0.0.1/32", 8000)),
        ("fd00::/8", ("fd00::/8", None)),
        ("[fd00::/8]:8443", ("fd00::/8", 8443)),
        ("[::1]", ("::1/128", None)),
    ],
)
def test_allowed_network_syntax(monkeypatch, entry, parsed):
    from agentsvc.env import env_allowed_networks, parse_allowed_network

    monkeypatch.setenv("WEBHOOK_ALLOWED_NETWORKS", f" {entry} ,10.0.0.0/8")
    assert env_allowed_networks("WEBHOOK_ALLOWED_NETWORKS") == [entry, "10.0.0.0/8"]
    found = parse_allowed_network(entry)
    assert (str(found.network), found.port) == parsed


@pytest.mark.parametrize(
    "entry",
    [
        "10.20.0.0/16:0",
        "10.20.0.0/16:65536",
        "10.20.0.0/16:https",
        "10.20.0.0/16:",
        "10.20.0.0/33",
        "fd00::/8:443",  # IPv6 with a port needs brackets
        "[fd00::/8",
        "[fd00::/8]443",
        "[fd00::/8]:",
        "intranet",
    ],
)
def test_a_bad_allowed_network_stops_start_up(monkeypatch, entry):
    from django.core.exceptions import ImproperlyConfigured

    from agentsvc.env import env_allowed_networks, env_port_list

    monkeypatch.setenv("WEBHOOK_ALLOWED_NETWORKS", f"10.0.0.0/8,{entry}")
    with pytest.raises(ImproperlyConfigured, match="WEBHOOK_ALLOWED_NETWORKS"):
        env_allowed_networks("WEBHOOK_ALLOWED_NETWORKS")
    monkeypatch.setenv("SERVICE_PORTS", "8000,x")
    with pytest.raises(ImproperlyConfigured, match="SERVICE_PORTS"):
        env_port_list("SERVICE_PORTS", [8000])
