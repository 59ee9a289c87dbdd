"""Code chains: an async function (ctx, input) behind the API, through the real executor."""

from __future__ import annotations

import json

import pytest

from runs.chains import ChainDefinitionError, chain_publish
from runs.models import ChainKind, RunEvent, RunStatus, RunStep
from runs.presenters import run_dict
from runs.services import run_create
from tests.conftest import fake
from tests.test_engine import execute


@pytest.fixture
def local_fake(settings, fake_model):
    """The `local` provider, which code chains' agents use by default, is the fake model."""
    settings.PROVIDERS = {
        **settings.PROVIDERS,
        "local": {**settings.PROVIDERS["local"], "base_url": fake_model.base_url},
    }
    return fake_model


def publish(entrypoint: str, name: str = "coded", **extra):
    chain, _ = chain_publish(
        definition={
            "name": name,
            "timeout_s": 60,
            "entrypoint": entrypoint,
            "input_schema": {"type": "object", "required": ["topic"]},
            **extra,
        }
    )
    return chain


def test_function_chain_runs_agents_tools_and_steps(alice, local_fake):
    chain = publish("tests.chaincode.functions:brief", model=fake(tools=1))
    assert chain.kind == ChainKind.FUNCTION and len(chain.source_hash) == 64
    writer = fake(tokens=6)
    run = run_create(
        api_key=alice.key,
        chain=chain,
        run_input={"topic": "tides", "writer_model": writer},
        metadata={},
    )
    run = execute(run)
    assert run.status == RunStatus.COMPLETED, run.error_message
    output = run_dict(run)["output"]
    assert len(output["draft"].split()) == 6 and output["words"] > 0
    types = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("type", flat=True))
    assert types.count("agent.started") == types.count("agent.completed") == 2
    assert "agent.tool_call" in types and "agent.tool_result" in types
    assert types[-1] == "run.completed"
    started = [e.data for e in RunEvent.objects.filter(run=run, type="agent.started")]
    assert [(s["agent"], s["index"]) for s in started] == [("researcher", 0), ("writer", 1)]
    progress = [e.data for e in RunEvent.objects.filter(run=run, type="run.progress")]
    assert progress[0]["message"] == "researched" and progress[0]["data"]["chars"] > 0
    assert progress[1] == {**progress[1], "step": "count"}
    keys = set(RunStep.objects.filter(run=run).values_list("key", flat=True))
    assert {"c0:researcher", "c0:researcher/m0", "c1:count", "c2:writer"} <= keys
    final = RunEvent.objects.get(run=run, type="run.completed").data
    assert final["output"] == output
    assert final["usage"]["output_tokens"] == run.output_tokens >= 6
    assert run.agents_completed == 2


def test_a_chain_that_raises_fails_with_its_error(alice, local_fake):
    run = run_create(
        api_key=alice.key,
        chain=publish("tests.chaincode.functions:broken"),
        run_input={"topic": "x"},
        metadata={},
    )
    run = execute(run)
    assert run.status == RunStatus.FAILED
    assert run.error_code == "chain_error"
    assert run.error_message == "ValueError: the chain's own bug"


@pytest.mark.parametrize(
    ("entrypoint", "message"),
    [
        ("tests.chaincode.nothere:brief", "cannot import tests.chaincode.nothere"),
        ("tests.chaincode.functions:nothere", "has no attribute nothere"),
        ("tests.chaincode.functions:not_async", "must be async"),
        ("tests.chaincode.functions:ANSWER", "found a int"),
        ("brief", "not of the form module:attribute"),
    ],
)
def test_publish_refuses_a_bad_entrypoint(db, entrypoint, message):
    with pytest.raises(ChainDefinitionError, match=message):
        publish(entrypoint)


def test_publish_refuses_agents_and_entrypoint(db, fake_model):
    with pytest.raises(ChainDefinitionError, match="either agents or entrypoint"):
        publish(
            "tests.chaincode.functions:brief",
            agents=[{"name": "a", "provider": "local", "model": "m", "prompt": "p"}],
        )


def test_a_changed_module_is_a_new_version(db, tmp_path, monkeypatch):
    package = tmp_path / "ownchain"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "flow.py"
    module.write_text("async def run(ctx, input):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = publish("ownchain.flow:run", name="own")
    assert publish("ownchain.flow:run", name="own").version == first.version  # unchanged
    module.write_text("async def run(ctx, input):\n    return 2\n")
    import importlib
    import sys

    importlib.reload(sys.modules["ownchain.flow"])
    second = publish("ownchain.flow:run", name="own")
    assert second.version == first.version + 1
    assert second.source_hash != first.source_hash
    assert json.dumps(second.entrypoint) == '"ownchain.flow:run"'


@pytest.mark.parametrize(
    ("entrypoint", "code", "message"),
    [
        ("not_storable", "output_invalid", "The chain's output is"),
        ("step_not_storable", "chain_error", "step 'infinite' returned a value that is"),
        ("nul_output", "output_invalid", "may not contain NUL"),
        ("nul_progress", "chain_error", "progress is"),
    ],
)
def test_values_the_database_cannot_hold_fail_the_run_clearly(
    alice, local_fake, entrypoint, code, message
):
    chain = publish(f"tests.chaincode.functions:{entrypoint}", name=entrypoint.replace("_", "-"))
    run = execute(run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={}))
    assert (run.status, run.error_code) == (RunStatus.FAILED, code)
    assert message in run.error_message
