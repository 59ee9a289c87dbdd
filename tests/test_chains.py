from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from runs.chains import ChainDefinitionError, chain_publish
from runs.models import Chain
from tests.conftest import fake, free_port
from tests.test_auth import assert_problem


def test_list_shows_latest_version(alice, make_chain):
    make_chain("alpha", models=[fake(tokens=3)])
    make_chain("alpha", models=[fake(tokens=3), fake(tokens=4)])
    make_chain("beta")
    response = alice.get("/api/v1/chains")
    assert response.status_code == 200
    body = response.json()
    assert body["next"] is None
    assert [(c["name"], c["version"]) for c in body["results"]] == [("alpha", 2), ("beta", 1)]
    alpha = body["results"][0]
    assert [a["name"] for a in alpha["agents"]] == ["agent0", "agent1"]
    assert set(alpha) == {
        "name",
        "version",
        "description",
        "kind",
        "entrypoint",
        "source_hash",
        "agents",
        "input_schema",
        "output_schema",
        "timeout_s",
        "estimated_duration_s",
        "available",
        "created_at",
    }
    assert alpha["available"] is True
    assert (alpha["kind"], alpha["entrypoint"], alpha["source_hash"]) == ("agents", None, None)
    assert alpha["agents"][0]["tools"] == []


def test_list_paginates(alice, make_chain):
    for name in ("a1", "a2", "a3"):
        make_chain(name)
    first = alice.get("/api/v1/chains", {"limit": 2}).json()
    assert [c["name"] for c in first["results"]] == ["a1", "a2"]
    second = alice.client.get(first["next"], headers=alice._headers(None)).json()
    assert [c["name"] for c in second["results"]] == ["a3"]
    assert second["next"] is None


def test_detail_and_versions(alice, make_chain):
    make_chain("alpha", models=[fake(tokens=3)])
    make_chain("alpha", models=[fake(tokens=3), fake(tokens=4)])
    assert alice.get("/api/v1/chains/alpha").json()["version"] == 2
    assert len(alice.get("/api/v1/chains/alpha", {"version": 1}).json()["agents"]) == 1
    assert_problem(alice.get("/api/v1/chains/alpha", {"version": 3}), 404, "not_found")
    assert_problem(alice.get("/api/v1/chains/alpha", {"version": "x"}), 400, "validation_error")
    assert_problem(alice.get("/api/v1/chains/nope"), 404, "not_found")


def test_unavailable_model_marks_chain(alice, make_chain):
    make_chain("down", base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert alice.get("/api/v1/chains/down").json()["available"] is False


def test_loadchains_versions_only_on_change(db, tmp_path, capsys):
    path = tmp_path / "chains.yaml"
    agent = "{name: a, provider: local, model: m, prompt: 'Hi {{ input.x }}'}"
    path.write_text(f"chains:\n  - name: c1\n    agents: [{agent}]\n")
    call_command("loadchains", str(path))
    call_command("loadchains", str(path))
    assert list(Chain.objects.filter(name="c1").values_list("version", flat=True)) == [1]
    path.write_text(f"chains:\n  - name: c1\n    timeout_s: 10\n    agents: [{agent}]\n")
    call_command("loadchains", str(path))
    assert sorted(Chain.objects.filter(name="c1").values_list("version", flat=True)) == [1, 2]
    assert "c1 v2 published" in capsys.readouterr().out


def test_demo_chains_load(db):
    call_command("loadchains", "chains/demo.yaml")
    assert Chain.objects.get(name="research-brief").agents.count() == 3
    assert Chain.objects.get(name="summarize").agents.count() == 1


@pytest.mark.parametrize(
    "definition, message",
    [
        ({"name": "Bad Name", "agents": []}, "must match"),
        ({"name": "c", "agents": []}, "non-empty"),
        (
            {
                "name": "c",
                "agents": [{"name": "a", "provider": "nope", "model": "m", "prompt": "x"}],
            },
            "unknown provider",
        ),
        (
            {
                "name": "c",
                "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "{% if %}"}],
            },
            "bad template",
        ),
        (
            {
                "name": "c",
                "input_schema": {"type": "nonsense"},
                "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "x"}],
            },
            "JSON Schema",
        ),
        (
            {
                "name": "c",
                "timeout_s": 0,
                "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "x"}],
            },
            "timeout_s",
        ),
    ],
)
def test_bad_definitions_are_refused(db, definition, message):
    with pytest.raises(ChainDefinitionError, match=message):
        chain_publish(definition=definition)
    assert not Chain.objects.exists()


def test_loadchains_reports_bad_file(db, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("chains: [{name: c}]\n")
    with pytest.raises(CommandError, match="agents"):
        call_command("loadchains", str(path))


def test_the_code_chains_make_run_loads(db):
    call_command("loadchains", "chains/demo.yaml")
    call_command("loadchains", "chains/code.yaml")
    clock = Chain.objects.get(name="world-clock").agents.get()
    assert [t["name"] for t in clock.tools] == ["local_time"]
    assert clock.tools[0]["parameters"]["properties"]["timezone"]["type"] == "string"
    brief = Chain.objects.get(name="function-brief")
    assert (brief.kind, brief.entrypoint) == ("function", "chains.examples.function_brief:brief")
