from __future__ import annotations

import pytest
from django.test import override_settings

from agentsvc.errors import PROBLEMS
from tests.conftest import Api
from tests.test_auth import assert_problem


def test_unknown_api_path_is_problem_404(alice):
    assert_problem(alice.get("/api/v1/nothing-here"), 404, "not_found")
    assert_problem(alice.get("/api/v1/runs/not-a-uuid"), 404, "not_found")


def test_wrong_method_is_405(alice):
    response = alice.client.delete("/api/v1/runs", headers=alice._headers(None))
    assert_problem(response, 405, "method_not_allowed")


def test_wrong_content_type_is_415(alice, make_chain):
    make_chain("demo")
    response = alice.post(
        "/api/v1/chains/demo/runs", raw=b"topic=x", content_type="application/x-www-form-urlencoded"
    )
    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b'{"input": {"topic": "x"}'])
def test_malformed_json_is_400(alice, make_chain, raw):
    make_chain("demo")
    body = assert_problem(alice.post("/api/v1/chains/demo/runs", raw=raw), 400, "validation_error")
    assert body["errors"][0]["field"] == "body"


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"input": {"topic": "a\\u0000b"}}', "input.topic"),
        (b'{"input": {"topic": "\\ud800"}}', "input.topic"),
        (b'{"input": {"topic": "x", "n": 1e999}}', "input.n"),  # infinity once parsed
        (b'{"input": {"list": [1, -1E400]}}', "input.list[1]"),
        (b'{"input": {}, "metadata": {"n": 1e999}}', "metadata.n"),
        (b'{"input": {}, "input": {"topic": "x"}}', "input"),  # a key twice
        (b'{"input": {"topic": "x", "topic": "y"}}', "input.topic"),
        (b'{"input": {"topic": "x", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "body"),
        (b'{"input": {"topic": "x", "deep": ' + b"[" * 100 + b"]" * 100 + b"}}", "body"),
    ],
)
def test_unstorable_json_is_400(alice, make_chain, raw, field):
    """Refused where it is: the field is named (the body, for nesting too deep)."""
    make_chain("demo", schema={"type": "object"})
    body = assert_problem(alice.post("/api/v1/chains/demo/runs", raw=raw), 400, "validation_error")
    assert body["errors"][0]["field"] == field


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
def test_non_object_body_is_400(alice, make_chain, raw):
    make_chain("demo")
    assert_problem(alice.post("/api/v1/chains/demo/runs", raw=raw), 400, "validation_error")


@override_settings(MAX_REQUEST_BYTES=2048, DATA_UPLOAD_MAX_MEMORY_SIZE=2048)
def test_large_body_is_413(alice, make_chain):
    make_chain("demo")
    body = {"input": {"topic": "x" * 5000}}
    assert_problem(alice.post("/api/v1/chains/demo/runs", body), 413, "payload_too_large")


def test_every_problem_code_has_a_page(db):
    client = Api(None).client
    for code, (status, title, _) in PROBLEMS.items():
        page = client.get(f"/api/problems/{code}")
        assert page.status_code == 200
        assert title in page.content.decode()
        assert str(status) in page.content.decode()
    assert client.get("/api/problems/no-such-code").status_code == 404


def test_bad_host_is_problem_json(alice):
    response = alice.get("/api/v1/runs", headers={"Host": "evil.example"})
    assert_problem(response, 400, "bad_request")
