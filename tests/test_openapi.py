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
