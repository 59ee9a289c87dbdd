"""Hand-written bad input: huge and deep bodies, broken encodings, NUL, wrong content types,
hostile headers and absurd query strings. Every answer is a 4xx problem+json with `type`,
`title` and `status`, no traceback, never a 500.

Most cases go through Django's test client (fast, the whole middleware stack); what a test
client would smooth over (chunked bodies, raw header bytes, the async stream view) goes to a
real daphne process."""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.sync.client import connect

from runs.models import Run
from runs.services import run_create
from tests.conftest import Api, process_env, start_web
from tests.test_ws import frames_until_close
from webhooks.models import WebhookEndpoint

BIG = 10 * 1024 * 1024
NESTED = b'{"input": {"topic": "x", "deep": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}"


def assert_clean_4xx(response, status: int | None = None) -> dict:
    """A 4xx problem+json (Django's or httpx's response) that shows nothing of the server."""
    text = response.content.decode("utf-8", "replace")
    assert 400 <= response.status_code < 500, (response.status_code, text[:500])
    if status is not None:
        assert response.status_code == status, text[:500]
    assert response.headers["Content-Type"] == "application/problem+json", text[:500]
    body = json.loads(text)
    assert body["type"].startswith("/api/problems/"), body
    assert body["title"] and body["status"] == response.status_code, body
    for leak in ("Traceback", 'File "', "psycopg", "django.", "Exception"):
        assert leak not in text, text
    return body


@pytest.fixture
def target(alice, make_chain):
    """Alice's objects, so each bad request hits a route that would otherwise work."""
    chain = make_chain("demo", schema={"type": "object"})
    run = run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={})
    endpoint = WebhookEndpoint.objects.create(
        owner=alice.key.owner, url="https://hooks.example.com/a", secret="s", events=[]
    )
    return {"run": run, "endpoint": endpoint}


# Every operation with a body: POSTs (which all read one for their Idempotency-Key) and PATCH.
BODY_ROUTES = [
    ("post", "/api/v1/chains/demo/runs"),
    ("post", "/api/v1/chains/demo/invoke"),
    ("post", "/api/v1/chains/demo/runs/batch"),
    ("post", "/api/v1/runs/{run}/cancel"),
    ("post", "/api/v1/runs/{run}/rerun"),
    ("post", "/api/v1/runs/{run}/webhooks/resend"),
    ("post", "/api/v1/webhook-endpoints"),
    ("patch", "/api/v1/webhook-endpoints/{endpoint}"),
    ("post", "/api/v1/webhook-endpoints/{endpoint}/rotate-secret"),
    ("post", "/api/v1/webhook-endpoints/{endpoint}/test"),
    ("post", "/api/v1/webhook-endpoints/{endpoint}/recover"),
    ("post", "/api/v1/runs/{run}/input"),
]

BAD_BODIES = {
    "deep": (NESTED, "application/json", 400),
    "invalid utf-8": (b'{"input": {"topic": "\xc3\x28\xff"}}', "application/json", 400),
    "utf-16 bom": ("{}".encode("utf-16"), "application/json", 400),
    "escaped NUL": (b'{"input": {"topic": "a\\u0000b"}}', "application/json", 400),
    "escaped NUL in a key": (b'{"input": {"a\\u0000": 1}}', "application/json", 400),
    "raw NUL": (b'{"input": {"topic": "a\x00b"}}', "application/json", 400),
    "lone surrogate": (b'{"description": "\\udfff"}', "application/json", 400),
    "truncated": (b'{"input": {', "application/json", 400),
    "NaN": (b'{"input": {"n": NaN}}', "application/json", 400),
    "huge number": (b'{"input": {"n": 1' + b"0" * 5000 + b"}}", "application/json", 400),
    "number beyond a double": (b'{"input": {"n": 1e999}}', "application/json", 400),
    "a key twice": (b'{"input": {}, "input": {}}', "application/json", 400),
    "text/plain": (b"{}", "text/plain", 415),
    "form": (b"input=x", "application/x-www-form-urlencoded", 415),
    "multipart": (
        b'--b\r\nContent-Disposition: form-data; name="input"\r\n\r\n{}\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
        415,
    ),
    "xml": (b"<input/>", "application/xml", 415),
}


def _path(template: str, target) -> str:
    return template.format(run=target["run"].id, endpoint=target["endpoint"].id)


@pytest.mark.parametrize("method,template", BODY_ROUTES)
@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies(alice, target, method, template, case):
    raw, content_type, status = BAD_BODIES[case]
    response = getattr(alice.client, method)(
        _path(template, target), raw, content_type=content_type, headers=alice._headers(None)
    )
    assert_clean_4xx(response, status)
    # Nothing was created, changed or cancelled.
    assert Run.objects.count() == 1 and Run.objects.get().status == "queued"
    assert WebhookEndpoint.objects.get().secret == "s"


@pytest.mark.parametrize("template", ["/api/v1/chains/demo/runs", "/api/v1/webhook-endpoints"])
@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_bodies_that_are_not_objects(alice, target, template, raw):
    assert_clean_4xx(alice.post(template, raw=raw), 400)
    assert Run.objects.count() == 1 and WebhookEndpoint.objects.count() == 1


WRONG_TYPES = [
    ("post", "/api/v1/chains/demo/invoke", {"wait_s": False}, "wait_s"),
    ("post", "/api/v1/chains/demo/invoke", {"wait_s": "1"}, "wait_s"),
    ("post", "/api/v1/chains/demo/runs", {"version": "1"}, "version"),
    ("post", "/api/v1/chains/demo/runs", {"version": True}, "version"),
    ("post", "/api/v1/chains/demo/runs", {"version": 1.5}, "version"),
    ("post", "/api/v1/chains/demo/runs", {"input": []}, "input"),
    ("post", "/api/v1/chains/demo/runs", {"metadata": {"k": {"nested": 1}}}, "metadata"),
    ("post", "/api/v1/chains/demo/runs", {"idempotency_key": 1}, "idempotency_key"),
    ("patch", "/api/v1/webhook-endpoints/{endpoint}", {"enabled": 1}, "enabled"),
    ("patch", "/api/v1/webhook-endpoints/{endpoint}", {"enabled": "yes"}, "enabled"),
    ("patch", "/api/v1/webhook-endpoints/{endpoint}", {"description": 5}, "description"),
    ("patch", "/api/v1/webhook-endpoints/{endpoint}", {"events": "run.failed"}, "events"),
    ("post", "/api/v1/chains/demo/runs/batch", {"items": {"input": {}}}, "items"),
    ("post", "/api/v1/chains/demo/runs/batch", {"items": [[]]}, "items[0]"),
    ("post", "/api/v1/chains/demo/runs/batch", {"items": [{"input": "x"}]}, "items[0]"),
    ("post", "/api/v1/runs/{run}/rerun", {"input": []}, "input"),
    ("post", "/api/v1/runs/{run}/input", {"request_id": 1, "approve": True}, "request_id"),
    ("post", "/api/v1/runs/{run}/input", {"request_id": "r", "approve": 1}, "approve"),
    ("post", "/api/v1/runs/{run}/input", {"request_id": "r", "input": "x"}, "input"),
    ("post", "/api/v1/runs/{run}/rerun", {"webhook": "none"}, "webhook"),
    ("post", "/api/v1/webhook-endpoints/{endpoint}/recover", {"since": 5}, "since"),
    ("post", "/api/v1/webhook-endpoints/{endpoint}/recover", {"since": None}, "since"),
]


@pytest.mark.parametrize("method,template,body,field", WRONG_TYPES)
def test_wrong_json_types(alice, target, method, template, body, field):
    """A JSON value of the wrong type is refused, not converted ("yes" is not true)."""
    response = getattr(alice.client, method)(
        _path(template, target),
        json.dumps(body),
        content_type="application/json",
        headers=alice._headers(None),
    )
    errors = assert_clean_4xx(response, 400)["errors"]
    assert field in {e["field"].split(".")[0] for e in errors}, errors
    assert Run.objects.count() == 1
    assert WebhookEndpoint.objects.get().enabled


@pytest.mark.parametrize("method,template", BODY_ROUTES)
def test_ten_megabytes(alice, target, method, template):
    raw = b'{"input": {"topic": "' + b"x" * BIG + b'"}}'
    response = getattr(alice.client, method)(
        _path(template, target), raw, content_type="application/json", headers=alice._headers(None)
    )
    assert_clean_4xx(response, 413)


@pytest.mark.parametrize("length", ["abc", "-1", "1" * 40, "1e3"])
def test_garbage_content_length(alice, target, length):
    response = alice.client.post(
        "/api/v1/chains/demo/runs",
        b"{}",
        content_type="application/json",
        headers=alice._headers(None),
        CONTENT_LENGTH=length,
    )
    assert_clean_4xx(response)


IDEMPOTENCY_KEYS = {
    "CR LF": "abc\r\nSet-Cookie: session=x",
    "LF": "abc\nX-Injected: 1",
    "NUL": "abc\x00def",
    "tab": "abc\tdef",
    "very long": "k" * 10_000,
    "256 characters": "k" * 256,
    "non-ASCII": "clé-ключ-鍵",
    "empty": "",
    "only spaces": "   ",
    "unterminated quote": '"abc',
    "quoted, bad escape": '"a\\bc"',
}


@pytest.mark.parametrize("case", list(IDEMPOTENCY_KEYS))
@pytest.mark.parametrize("method,template", BODY_ROUTES[:1] + BODY_ROUTES[4:5])
def test_hostile_idempotency_keys(alice, target, case, method, template):
    response = getattr(alice.client, method)(
        _path(template, target),
        {"input": {}} if "chains" in template else {"url": "https://hooks.example.com/b"},
        content_type="application/json",
        headers=alice._headers({"Idempotency-Key": IDEMPOTENCY_KEYS[case]}),
    )
    body = assert_clean_4xx(response, 400)
    assert body["errors"][0]["field"] == "Idempotency-Key"
    assert "X-Injected" not in response.headers and not response.cookies
    assert Run.objects.count() == 1 and WebhookEndpoint.objects.count() == 1


def test_idempotency_key_in_the_body_is_checked_too(alice, target):
    for value in ("abc\r\ndef", "k" * 300, 12, None, ["k"], {"k": 1}):
        response = alice.post("/api/v1/chains/demo/runs", {"input": {}, "idempotency_key": value})
        assert_clean_4xx(response, 400)
    assert Run.objects.count() == 1


QUERIES = {
    "/api/v1/runs": [
        {"limit": "-1"},
        {"limit": "0"},
        {"limit": str(10**30)},
        {"limit": "1e3"},
        {"limit": "abc"},
        {"limit": ""},
        {"limit": "²"},  # str.isdigit() says yes, int() says no
        {"cursor": "garbage"},
        {"cursor": "!!!!"},
        {"cursor": "x" * 10_000},
        {"cursor": "eyJhIjogMX0="},  # base64 of a JSON object
        {"cursor": "WyJ4IiwgInkiXQ"},  # base64 of ["x", "y"]
        {"cursor": "\x00"},
        {"status": "done"},
        {"status": "queued,"},
        {"status": "ü"},
        {"status": "\x00"},
        {"chain": "日本"},
        {"chain": "\x00"},
        {"chain": "x" * 10_000},
        {"created_after": "yesterday"},
        {"created_after": "2026-01-01"},
        {"created_after": "99999-01-01T00:00:00Z"},
        {"created_after": "2026-01-01T00:00:00+99:00"},
        {"created_after": "\x00"},
        {"unknown": "1"},
        {"limit": ["1", "x"]},
        {"limit": ["x", "1"], "status": ["queued", "nope"]},
    ],
    "/api/v1/chains": [{"limit": "-1"}, {"cursor": "garbage"}, {"cursor": "\x00"}, {"q": "x"}],
    "/api/v1/chains/demo": [
        {"version": "0"},
        {"version": str(10**30)},
        {"version": "\x00"},
        {"version": "1.5"},
    ],
    "/api/v1/webhook-endpoints": [{"limit": str(10**30)}, {"cursor": "garbage"}],
    "/api/v1/runs/{run}/events": [
        {"after": "-1"},
        {"after": str(10**30)},
        {"after": "1e3"},
        {"after": "²"},
        {"limit": "0"},
        {"limit": "100000"},
        {"x": "y"},
        {"events": "nope"},
        {"events": ""},
        {"events": ","},
        {"events": "\x00"},
        {"events": "run.completed," + "x" * 10_000},
        {"events": "RUN.COMPLETED"},
    ],
    "/api/v1/runs/{run}/deliveries": [{"cursor": "garbage"}, {"limit": "-1"}],
    "/api/v1/runs/{run}": [{"anything": "x"}],
    "/api/v1/webhook-endpoints/{endpoint}": [{"anything": "x"}],
}
QUERY_CASES = [(path, q) for path, queries in QUERIES.items() for q in queries]


@pytest.mark.parametrize("template,params", QUERY_CASES, ids=[f"{p} {q}" for p, q in QUERY_CASES])
def test_absurd_query_parameters(alice, target, template, params):
    assert_clean_4xx(alice.get(_path(template, target), params), 400)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/runs/not-a-uuid",
        "/api/v1/runs/123",
        f"/api/v1/runs/{uuid.uuid4()}x",
        f"/api/v1/runs/{str(uuid.uuid4()).upper()}",  # a UUID, but unknown
        "/api/v1/runs/%00",
        "/api/v1/runs/../runs",
        "/api/v1/runs/" + "a" * 10_000,
        "/api/v1/runs/not-a-uuid/cancel",
        "/api/v1/runs/not-a-uuid/events",
        "/api/v1/webhook-endpoints/1",
        "/api/v1/deliveries/x/resend",
        "/api/v1/chains/日本",
        "/api/v1/chains/a%2Fb",
        "/api/v1/chains/" + "c" * 10_000,
    ],
)
def test_path_ids_that_are_not_ids(alice, target, path):
    assert_clean_4xx(alice.get(path), None)
    assert_clean_4xx(alice.post(path, {}), None)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer " + "ak_" + "x" * 10_000},
        {"Authorization": "Bearer ak_" + "\x00" * 40},
        {"Authorization": "Bearer ak_ключключключключключключключключключключ"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer  "},
        {"Authorization": "ak_" + "x" * 40},
        {"X-API-Key": "ak_" + "\x00" * 40},
        {"X-API-Key": ""},
        {"Accept": "application/xml"},
        {"Accept": "\x00"},
    ],
)
def test_hostile_headers(alice, target, headers):
    api = Api(None) if "Authorization" in headers or "X-API-Key" in headers else alice
    response = api.client.get("/api/v1/runs", headers=api._headers(headers))
    if "Accept" in headers:
        # One representation: JSON whatever the Accept header says.
        assert response.status_code == 200
        return
    assert_clean_4xx(response, 401)


# --- Echoes: a problem repeats at most a short prefix of what the caller sent ------------------

LONG = "z" * 10_000


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def assert_no_long_echo(response) -> dict:
    """A probe sent a 10,000-character chain name and got all of it back in the 404."""
    body = assert_clean_4xx(response)
    assert len(response.content) < 3000, len(response.content)
    for text in _strings(body):
        assert "z" * 101 not in text, text[:300]
    return body


def test_problems_cut_what_they_repeat(alice, target):
    long_chain = "/api/v1/chains/" + LONG
    body = assert_no_long_echo(alice.post(long_chain + "/runs", {"input": {}}))
    assert body["detail"] == f"No chain named {'z' * 64 + '…'!r}."
    assert body["instance"].startswith("/api/v1/chains/zzz") and body["instance"].endswith("…")
    assert_no_long_echo(alice.post(long_chain + "/invoke", {"input": {}, "version": 3}))
    assert_no_long_echo(alice.get(long_chain))
    for params in ({"status": LONG}, {"chain": LONG}, {LONG: "1"}, {"limit": LONG}):
        body = assert_no_long_echo(alice.get("/api/v1/runs", params))
        assert all(len(e["field"]) <= 101 for e in body["errors"])
    # Body fields: unknown names, and values the chain's JSON Schema or a choice refuses.
    assert_no_long_echo(alice.post("/api/v1/chains/demo/runs", {"input": {}, LONG: 1}))
    endpoints = "/api/v1/webhook-endpoints"
    assert_no_long_echo(alice.post(endpoints, {"url": "https://a.example", "events": [LONG]}))
    many = {f"x{i}": 1 for i in range(500)}
    body = assert_no_long_echo(alice.post(endpoints, {"url": "https://a.example", **many}))
    assert len(body["errors"]) == 50


def test_input_schema_errors_cut_the_value(alice, make_chain):
    make_chain("typed", schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    body = assert_no_long_echo(alice.post("/api/v1/chains/typed/runs", {"input": {"n": LONG}}))
    assert body["errors"][0]["field"] == "input.n"


# --- Over a real server ------------------------------------------------------------------------


def _raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Bytes on the wire, for what an HTTP client refuses to send."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(head + body)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> httpx.Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    if ("Transfer-Encoding", "chunked") in headers:
        decoded, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            decoded, rest = decoded + rest[:n], rest[n + 2 :]
        body = decoded
    return httpx.Response(status, headers=headers, content=body)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.parametrize("path", ["/api/v1/chains/demo/runs", "/api/v1/chains/demo/stream"])
def test_on_the_wire(live_server_url, alice, make_chain, path):
    make_chain("demo", schema={"type": "object"})
    auth = f"Authorization: Bearer {alice.raw_key}\r\n".encode()
    host = f"Host: {urlsplit(live_server_url).netloc}\r\n".encode()

    def send(head: bytes, body: bytes = b"") -> httpx.Response:
        request = b"POST " + path.encode() + b" HTTP/1.1\r\n" + host + auth + head
        return _parse(_raw_request(live_server_url, request + b"Connection: close\r\n\r\n", body))

    # 10 MB, declared, and chunked without a Content-Length.
    big = b'{"input": {"topic": "' + b"x" * BIG + b'"}}'
    assert_clean_4xx(
        send(f"Content-Type: application/json\r\nContent-Length: {len(big)}\r\n".encode(), big),
        413,
    )
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(big[i : i + 65536]), big[i : i + 65536])
        for i in range(0, len(big), 65536)
    )
    assert_clean_4xx(
        send(
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
            chunked + b"0\r\n\r\n",
        ),
        413,
    )
    # No content type at all, and a multipart body.
    assert_clean_4xx(send(b"Content-Length: 2\r\n", b"{}"), 415)
    multipart = b'--b\r\nContent-Disposition: form-data; name="input"\r\n\r\n{}\r\n--b--\r\n'
    assert_clean_4xx(
        send(
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(multipart)}\r\n".encode(),
            multipart,
        ),
        415,
    )
    # Bodies the server would parse as a form before the application sees them (a broken
    # multipart one got a bare 400): the API's own 415 instead.
    for content_type, body in (
        (b"multipart/form-data; boundary=b", b"not multipart at all"),
        (b"multipart/form-data", multipart),
        (b"application/x-www-form-urlencoded", b"input=%zz&&=="),
    ):
        assert_clean_4xx(
            send(
                b"Content-Type: "
                + content_type
                + b"\r\n"
                + f"Content-Length: {len(body)}\r\n".encode(),
                body,
            ),
            415,
        )
    # A number beyond a double (which parses to infinity, and PostgreSQL refuses) and a key
    # sent twice (which readers would take differently): 400 naming the field, with an
    # Idempotency-Key too (the fast lane takes create calls without one, Django those with).
    for raw, field in (
        (b'{"input": {"topic": "x", "n": 1e999}}', "input.n"),
        (b'{"input": {"topic": "x"}, "metadata": {"n": -1e999}}', "metadata.n"),
        (b'{"input": {"topic": "x"}, "input": {"topic": "y"}}', "input"),
        (b'{"input": {"topic": "x", "topic": "y"}}', "input.topic"),
    ):
        for idempotency in (b"", b"Idempotency-Key: k-refused\r\n"):
            response = send(
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(raw)}\r\n".encode()
                + idempotency,
                raw,
            )
            body = assert_clean_4xx(response, 400)
            assert body["code"] == "validation_error", body
            assert body["errors"][0]["field"] == field, (raw, body)
    # Idempotency keys with bytes an HTTP client would not send. daphne itself answers a bare
    # CR or a NUL in a header with a bare 400 (RFC 9110): the application never sees those.
    for key in (b"abc\rdef", b"\xff\xfe", b"cl\xc3\xa9", b"\x00", b"a" * 300):
        response = send(
            b"Content-Type: application/json\r\nContent-Length: 2\r\nIdempotency-Key: "
            + key
            + b"\r\n",
            b"{}",
        )
        if b"\r" in key or b"\x00" in key:
            assert response.status_code == 400 and not response.content
        else:
            assert_clean_4xx(response, 400)
    assert not Run.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_stream_views_bad_input(live_server_url, alice, make_chain):
    """The async views outside DRF answer like the rest."""
    chain = make_chain("demo", schema={"type": "object"})
    run = run_create(api_key=alice.key, chain=chain, run_input={}, metadata={})
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    sse = {**headers, "Accept": "text/event-stream"}
    with httpx.Client(base_url=live_server_url, timeout=30) as http:

        def post(**kwargs) -> httpx.Response:
            with http.stream("POST", "/api/v1/chains/demo/stream", **kwargs) as response:
                if response.status_code == 200:  # a stream: the case was accepted
                    return response
                response.read()
                return response

        for raw, content_type, status in BAD_BODIES.values():
            response = post(content=raw, headers={**headers, "Content-Type": content_type})
            assert_clean_4xx(response, status)
        for flag in (1, "true", "yes"):
            response = post(json={"cancel_on_disconnect": flag}, headers=headers)
            assert_clean_4xx(response, 400)
        for key in IDEMPOTENCY_KEYS.values():
            try:
                response = post(json={}, headers={**headers, "Idempotency-Key": key})
            except (httpx.LocalProtocolError, UnicodeEncodeError):
                continue  # httpx will not send it; test_on_the_wire sends such bytes
            assert_clean_4xx(response, 400)
        for params in QUERIES["/api/v1/runs/{run}/events"]:
            with http.stream(
                "GET", f"/api/v1/runs/{run.id}/events", params=params, headers=sse
            ) as response:
                response.read()
            assert_clean_4xx(response, 400)
        for last_event_id in ("-1", "x", "1" * 30, "1.0", "²"):
            response = http.get(
                f"/api/v1/runs/{run.id}/events",
                headers={**sse, "Last-Event-ID": last_event_id.encode()},
            )
            assert_clean_4xx(response, 400)
        for path in ("/api/v1/runs/not-a-uuid/events", "/api/v1/chains/日本/stream"):
            assert_clean_4xx(http.get(path, headers=sse), 404)
    # The WebSocket: closed with a code before any frame.
    ws = live_server_url.replace("http://", "ws://") + f"/ws/v1/runs/{run.id}"
    for query, code, auth in [
        ("after=%C2%B2", 4400, headers),
        ("after=-1", 4400, headers),
        (f"after={10**30}", 4400, headers),
        ("api_key=ak_" + "%00" * 40, 4401, {}),
        ("api_key=" + "k" * 10_000, 4401, {}),
        ("ticket=" + "%00" * 40, 4401, {}),
        ("ticket=" + "t" * 10_000, 4401, {}),
        ("ticket=a:b:c", 4401, {}),
    ]:
        with connect(f"{ws}?{query}", additional_headers=auth) as sock:
            assert frames_until_close(sock) == ([], code), query
    assert Run.objects.count() == 1


# Paths that climb out of the static files, as curl --path-as-is sends them. The server decodes
# %2e and %2f, so every form reaches the static handler as "/static/../...".
CLIMBING_PATHS = [
    "/static/../agentsvc/settings.py",
    "/static/%2e%2e/agentsvc/settings.py",
    "/static/..%2fagentsvc/settings.py",
    "/static/%2e%2e%2f%2e%2e%2fetc/passwd",
    "/static/admin/../../../../etc/passwd",
]


@pytest.mark.slow
def test_paths_no_route_knows_are_404_without_a_traceback(tmp_path):
    """A black-box probe got a 500 and a traceback logged at ERROR per request for static paths
    that climb out (SuspiciousFileOperation: the static handler runs outside the middleware
    chain, so nothing else caught it) and for WebSockets to paths no route knows (Channels'
    `No route found for path`, a bare 500 from daphne), without a key. Now: 404 problem+json,
    or for a WebSocket an accept and close 4404, and nothing logged above INFO."""
    log = tmp_path / "web.log"
    web, url = start_web(process_env(), log)
    host = f"Host: {urlsplit(url).netloc}\r\n".encode()

    def get(path: str) -> httpx.Response:
        head = f"GET {path} HTTP/1.1\r\n".encode() + host + b"Connection: close\r\n\r\n"
        return _parse(_raw_request(url, head))

    try:
        for path in [*CLIMBING_PATHS, "/static/runs/nothing.js", "/static/"]:
            response = get(path)
            assert_clean_4xx(response, 404)
            assert b"SECRET_KEY" not in response.content and b"root:" not in response.content
        # The static files themselves are still served.
        ok = get("/static/runs/dashboard.js")
        assert ok.status_code == 200 and b"WebSocket" in ok.content
        ws = url.replace("http://", "ws://")
        for path in (
            "/ws/nothing",
            "/ws/v1/runs/notauuid",
            f"/ws/v1/runs/{uuid.uuid4()}/extra",
            "/ws/v1/runs/",
            "/foo",
            "/api/v1/runs",
            "/",
        ):
            with connect(ws + path) as sock:
                assert frames_until_close(sock) == ([], 4404), path
    finally:
        web.stop()
    output = web.output()
    for leak in ("Traceback", "SuspiciousFileOperation", "No route found", " ERROR ", " WARNING "):
        assert leak not in output, output[-3000:]
