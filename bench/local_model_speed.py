"""Tokens per second on the embedded default's real model: through the API, and asking the model
server directly, in the same run (the difference is the API's overhead).

    .venv/bin/python bench/local_model_speed.py [--runs 5]

Starts `manage.py serve` (SQLite, SmolLM2 on llama.cpp) in a temporary DATA_DIR.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, ROOT, free_port

PROMPT = "Write a short paragraph about the history of lighthouses."
MAX_TOKENS = 160


def direct(model_url: str) -> float:
    """Output tokens per second streaming straight from the model server."""
    started = time.perf_counter()
    first = None
    usage = None
    with httpx.stream(
        "POST",
        f"{model_url}/chat/completions",
        timeout=120,
        json={
            "model": "smollm2-135m-instruct",
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "messages": [{"role": "user", "content": PROMPT}],
        },
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter()
            if '"usage"' in line and '"choices": []' in line:
                usage = int(re.search(r'"completion_tokens": (\d+)', line).group(1))
    return usage / (time.perf_counter() - started)


def through_api(base: str, key: str) -> float:
    """Output tokens per second of a one-agent run: started_at to finished_at."""
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    run = http.post(
        "/api/v1/chains/summarize/invoke", json={"input": {"text": PROMPT}, "wait_s": 60}
    ).json()
    assert run["status"] == "completed", run
    return run["usage"]["output_tokens"] / (run["duration_ms"] / 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_port, web_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(
            DATA_DIR=tmp,
            LOCAL_MODEL="smollm2",
            LOG_LEVEL="WARNING",
            LOCAL_MODEL_URL=f"http://127.0.0.1:{model_port}/v1",
        )
        log = Path(tmp) / "serve.log"
        started = time.perf_counter()
        proc = subprocess.Popen(
            [PY, "manage.py", "serve", "--port", str(web_port)],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            while "demo API key" not in log.read_text():
                if proc.poll() is not None:
                    sys.exit(log.read_text())
                time.sleep(0.2)
            ready_s = time.perf_counter() - started
            key = re.search(r"demo API key: (\S+)", log.read_text()).group(1)
            model_url = env["LOCAL_MODEL_URL"]
            api, raw = [], []
            for _ in range(args.runs):
                raw.append(direct(model_url))
                api.append(through_api(f"http://127.0.0.1:{web_port}", key))
            print(f"time to ready: {ready_s:.1f} s")
            print(f"direct  output tokens/s: median {statistics.median(raw):.1f}")
            print(
                f"via API output tokens/s: median {statistics.median(api):.1f} "
                f"({statistics.median(api) / statistics.median(raw):.2f}x)"
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
