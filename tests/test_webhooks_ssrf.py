"""The SSRF guard at registration and at delivery: nothing private is ever connected to.

Only DNS answers are patched; the receivers are real servers on loopback.
"""

from __future__ import annotations

import socket

import pytest

from runs.executor import run_execute
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
