"""The OpenAPI document: served as YAML or JSON as asked, and the committed copy
(docs/openapi.json) is the one served."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from django.test import Client

from tests.conftest import ROOT

REGENERATE = ".venv/bin/python manage.py spectacular --format openapi-json --file docs/openapi.json"


@pytest.mark.parametrize(
    "accept, query, content_type",
    [
        ("application/json", "", "application/json"),
        ("application/vnd.oai.openapi+json", "", "application/vnd.oai.openapi+json"),
        ("*/*", "?format=json", "application/json"),
        ("", "?format=json", "application/json"),
    ],
)
def test_schema_answers_json_when_json_is_asked(db, accept, query, content_type):
    headers = {"Accept": accept} if accept else {}
    response = Client().get(f"/api/v1/schema{query}", headers=headers)
    assert response.status_code == 200
    assert response["Content-Type"].split(";")[0] == content_type
    assert json.loads(response.content)["openapi"].startswith("3.")


@pytest.mark.parametrize("accept", ["", "*/*", "application/yaml", "application/vnd.oai.openapi"])
def test_schema_answers_yaml_by_default_and_to_yaml(db, accept):
    headers = {"Accept": accept} if accept else {}
    response = Client().get("/api/v1/schema", headers=headers)
    assert response.status_code == 200
    assert "yaml" in response["Content-Type"] or "openapi" in response["Content-Type"]
    assert yaml.safe_load(response.content)["openapi"].startswith("3.")


@pytest.mark.parametrize(
    "accept, query, status", [("text/html", "", 406), ("", "?format=xml", 404)]
)
def test_schema_refuses_what_it_cannot_produce_as_problems(db, accept, query, status):
    headers = {"Accept": accept} if accept else {}
    response = Client().get(f"/api/v1/schema{query}", headers=headers)
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"


def test_committed_document_is_the_served_one(db):
    served = json.loads(Client().get("/api/v1/schema?format=json").content)
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed, (
        f"docs/openapi.json is out of date; regenerate it with: {REGENERATE}"
    )


def _documented_codes() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    codes = text[text.index("\nCodes: ") : text.index("explains each")]
    return re.findall(r"`([a-z_]+)`", codes)


@pytest.mark.parametrize("code", _documented_codes())
def test_every_documented_problem_code_has_its_page(db, code):
    response = Client().get(f"/api/problems/{code}")
    assert response.status_code == 200, code
    assert code.encode() in response.content


# --- What a client generated from the document needs to know -------------------------------


def _document() -> dict:
    return json.loads((ROOT / "docs" / "openapi.json").read_text())


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_streams_are_text_not_json_objects():
    """A generated client parsed the stream as a JSON object and crashed on its first line: the
    body's schema is no object (generated clients hand back its text), each event is the
    itemSchema's (which schemathesis checks every event against)."""
    paths = _document()["paths"]
    for content in (
        paths["/api/v1/chains/{name}/stream"]["post"]["responses"]["200"]["content"],
        paths["/api/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"],
    ):
        stream = content["text/event-stream"]
        assert "type" not in stream["schema"] and "properties" not in stream["schema"]
        assert set(stream["itemSchema"]["properties"]) == {"id", "event", "data", "retry"}
    events = paths["/api/v1/runs/{run_id}/events"]["get"]["responses"]
    assert "204" in events and "406" in events


def test_headers_members_and_schemes_the_server_sends_are_declared():
    document = _document()
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`ak_...`",
    }
    assert schemes["apiKey"]["scheme"] == "bearer"
    problem = document["components"]["schemas"]["Problem"]["properties"]
    assert problem["violated-policies"]["type"] == "array"
    replayed = 0
    for path, _, operation in _operations(document):
        if path.startswith("/api/v1/"):
            assert operation["security"] == [{"apiKey": []}, {"apiKeyHeader": []}], path
        idempotent = [p for p in operation.get("parameters", []) if p["name"] == "Idempotency-Key"]
        for status, response in operation["responses"].items():
            if idempotent and status.startswith("2"):
                assert "Idempotent-Replayed" in response["headers"], (path, status)
                replayed += 1
        for parameter in idempotent:  # what parse_key enforces
            assert parameter["schema"]["maxLength"] == 257, path
            assert parameter["schema"]["pattern"] == "^[\\u0020-\\u007e]+$", path
    assert replayed >= 15
    created = document["paths"]["/api/v1/webhook-endpoints"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]


def test_constraints_the_server_enforces_are_stated():
    document = _document()
    schemas = document["components"]["schemas"]
    items = schemas["RunBatchInputRequest"]["properties"]["items"]
    assert (items["minItems"], items["maxItems"]) == (1, 100)
    for name in ("since", "until"):
        assert schemas["RecoverInputRequest"]["properties"][name]["format"] == "date-time"
    (created_after,) = [
        p
        for p in document["paths"]["/api/v1/runs"]["get"]["parameters"]
        if p["name"] == "created_after"
    ]
    assert created_after["schema"] == {"type": "string", "format": "date-time"}


def test_one_tag_per_part_of_the_api():
    """Tags become a generated client's modules: the runs' calls are together, whatever their
    path (a run is started under /chains/{name}/)."""
    document = _document()
    tags = {t["name"] for t in document["tags"]}
    assert tags == {"chains", "runs", "webhooks", "streams", "schedules"}
    by_tag: dict[str, set[str]] = {}
    for _, _, operation in _operations(document):
        (tag,) = operation["tags"]
        by_tag.setdefault(tag, set()).add(operation["operationId"])
    assert set(by_tag) == tags
    assert {"runs_create", "runs_stream", "runs_events", "runs_retrieve"} <= by_tag["runs"]
    assert by_tag["chains"] == {"chains_list", "chains_retrieve"}
