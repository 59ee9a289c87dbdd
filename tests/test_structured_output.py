"""Structured output: a chain's output_schema makes its last agent ask the model for JSON
(`response_format` json_schema), and the run's output is the validated JSON value. End to end
with a live server, a real executor, the fake model and the webhook receiver."""

from __future__ import annotations

import json

import httpx
import pytest
from standardwebhooks import Webhook

from runs.chains import ChainDefinitionError, chain_publish
from runs.models import Run
from tests.conftest import fake, wait_until
from tests.sse_client import events
from tests.test_sse import SSE, settle
from tests.webhook_support import SECRET, hook_path

SCHEMA = {
    "type": "object",
    "required": ["summary", "words"],
    "additionalProperties": False,
    "properties": {"summary": {"type": "string"}, "words": {"type": "integer"}},
}


@pytest.fixture
def http(live_server_url, worker, alice):
    with httpx.Client(
        base_url=live_server_url, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as client:
        yield client
    settle()


def run_to_end(http, body: dict) -> tuple[str, list]:
    with http.stream("POST", "/api/v1/chains/brief/stream", json=body, headers=SSE) as response:
        assert response.status_code == 200, response.read()
        frames = list(events(response.iter_lines()))
    return frames[0].data["run_id"], frames


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_structured_run_output_is_the_json_value_everywhere(http, make_chain, fake_model, receiver):
    first, last = fake(tokens=3), fake(tokens=4, json=1)
    make_chain("brief", models=[first, last], output_schema=SCHEMA)
    chain = http.get("/api/v1/chains/brief").json()
    assert chain["output_schema"] == SCHEMA
    path = hook_path()
    webhook = {"url": receiver.base_url + path, "secret": SECRET}
    run_id, frames = run_to_end(http, {"input": {"topic": "tides"}, "webhook": webhook})
    # The last agent, and only it, asked for JSON matching the schema.
    assert fake_model.bodies[last]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "brief", "schema": SCHEMA, "strict": True},
    }
    assert "response_format" not in fake_model.bodies[first]
    # The stream carries the raw chunks; run.completed and the run carry the JSON value.
    text = "".join(f.data["chunk"] for f in frames if f.event == "agent.output" and f.data["index"])
    value = json.loads(text)
    assert value == {"summary": value["summary"], "words": 4}
    assert frames[-1].event == "run.completed" and frames[-1].data["output"] == value
    run = http.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "completed" and run["output"] == value
    listed = http.get("/api/v1/runs", params={"chain": "brief"}).json()["results"]
    assert listed[0]["output"] == value
    [request] = wait_until(lambda: receiver.requests_for(path), 30, message="the webhook")
    assert Webhook(SECRET).verify(request.body, request.headers)["data"]["output"] == value
    # invoke answers the finished run the same way.
    invoked = http.post("/api/v1/chains/brief/invoke", json={"input": {"topic": "moon"}})
    assert invoked.status_code == 200 and invoked.json()["output"]["words"] == 4


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, message",
    [
        ("bad", "The model's output is not valid JSON"),
        ("wrong", "does not match the output schema at output.summary"),
    ],
)
def test_output_that_does_not_parse_or_match_fails_the_run(http, make_chain, mode, message):
    make_chain("brief", models=[fake(tokens=3, json=mode)], output_schema=SCHEMA)
    run_id, frames = run_to_end(http, {"input": {"topic": "tides"}})
    assert frames[-1].event == "run.failed"
    assert frames[-1].data["error"]["code"] == "output_invalid"
    assert message in frames[-1].data["error"]["message"]
    run = http.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "failed" and run["output"] is None
    assert run["error"]["code"] == "output_invalid" and message in run["error"]["message"]
    failed = http.post("/api/v1/chains/brief/invoke", json={"input": {"topic": "x"}})
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "output_invalid"


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "array"}, "type: object"),
        ("object", "type: object"),
        ({"type": "object", "properties": {"a": {"type": "nope"}}}, "not valid JSON Schema"),
    ],
)
def test_output_schema_must_be_an_object_schema(db, fake_model, schema, reason):
    definition = {
        "name": "brief",
        "output_schema": schema,
        "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "p"}],
    }
    with pytest.raises(ChainDefinitionError, match=reason):
        chain_publish(definition=definition)


def test_chains_without_output_schema_keep_text_output_and_their_version(
    alice, make_chain, fake_model
):
    chain = make_chain("plain", models=[fake(tokens=2, tag="same")])
    assert alice.get("/api/v1/chains/plain").json()["output_schema"] is None
    # Loading the unchanged definition again adds no version: its hash did not change.
    assert make_chain("plain", models=[fake(tokens=2, tag="same")]).pk == chain.pk
    run = Run.objects.create(
        owner=alice.key.owner, api_key=alice.key, chain=chain, output='{"a": 1}'
    )
    assert alice.get(f"/api/v1/runs/{run.id}").json()["output"] == '{"a": 1}'
