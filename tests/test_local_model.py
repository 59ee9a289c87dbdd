"""The embedded default's real model: SmolLM2-135M-Instruct served by llama.cpp, end to end."""

from __future__ import annotations

import os

import httpx
import pytest
from django.conf import settings
from llama_cpp import Llama

from agentsvc.local_model import model_command, smollm2_path
from runs.chains import chain_publish
from runs.execution.executor import run_execute
from runs.models import Run, RunEvent, RunStatus
from runs.services import run_create
from tests.conftest import Proc, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    base = f"http://127.0.0.1:{free_port()}/v1"
    # The same command `make run` uses.
    proc = Proc(
        model_command(base), dict(os.environ), tmp_path_factory.mktemp("llama") / "server.log"
    )

    def ready():
        assert proc.proc.poll() is None, proc.output()[-3000:]
        try:
            return httpx.get(f"{base}/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 180, 0.5, "llama.cpp server")
    yield base
    proc.stop()


def test_demo_chain_on_the_real_model(alice, llama_server):
    prompt = "Write one short sentence about {{ input.topic }}."
    chain, _ = chain_publish(
        definition={
            "name": "real",
            "timeout_s": 120,
            "input_schema": {"type": "object", "required": ["topic"]},
            "agents": [
                {
                    "name": "writer",
                    "provider": "local",
                    "model": settings.LOCAL_MODEL_NAME,
                    "base_url": llama_server,
                    "prompt": prompt,
                    "max_tokens": 24,
                    "temperature": 0,
                }
            ],
        }
    )
    run = run_create(api_key=alice.key, chain=chain, run_input={"topic": "the sea"}, metadata={})
    run_execute(run_id=str(run.id))
    run = Run.objects.get(pk=run.id)
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert run.output.strip()
    chunks = list(RunEvent.objects.filter(run=run, type="agent.output"))
    assert len(chunks) >= 1
    assert "".join(c.data["chunk"] for c in chunks) == run.output
    assert run.cost == 0

    # The server's own counts, independently: the prompt as a non-streamed request counts it,
    # and the output as the model's tokenizer splits it (greedy runs need not repeat exactly
    # across requests, so the output itself is not compared).
    direct = httpx.post(
        f"{llama_server}/chat/completions",
        timeout=120,
        json={
            "model": settings.LOCAL_MODEL_NAME,
            "max_tokens": 1,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
        },
    ).json()
    assert run.input_tokens == direct["usage"]["prompt_tokens"]
    vocab = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    assert run.output_tokens == len(
        vocab.tokenize(run.output.encode(), add_bos=False, special=True)
    )
    assert 0 < run.output_tokens <= 24
