"""End-to-end time of one run on the zero-latency fake model, one run at a time.

    .venv/bin/python bench/run_latency.py [--runs 100] [--configs embedded,production]
                                          [--chains one,three]

Starts the fake model server, daphne and one executor (`manage.py executor`) in each
configuration, creates runs one after another over HTTP and reports, per chain:
  server: finished_at - created_at (API accepted it -> executor wrote the terminal event)
  client: POST sent -> client saw the terminal status (polling GET /runs/{id} every 5 ms)
  model:  the same completion asked of the model server directly, once per agent; the
          platform's overhead per run is server minus model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PY,
    config_env,
    executor_command,
    exit_on_sigterm,
    free_port,
    manage,
    processes,
    reset_database,
    summary,
    wait_http,
    write_json,
)

CHAINS = """
chains:
  - name: one
    agents:
      - {name: a, provider: local, model: "fake?tokens=5", prompt: "{{ input.topic }}"}
  - name: three
    agents:
      - {name: a, provider: local, model: "fake?tokens=5", prompt: "{{ input.topic }}"}
      - {name: b, provider: local, model: "fake?tokens=5", prompt: "{{ previous }}"}
      - {name: c, provider: local, model: "fake?tokens=5", prompt: "{{ previous }}"}
"""


def ms_between(a: str, b: str) -> float:
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(b) - parse(a)).total_seconds() * 1000


def model_ms(base_url: str, agents: int, calls: int = 20) -> list[float]:
    """A run's model time: `agents` streamed completions of the chain's model, back to back."""
    body = {
        "model": "fake?tokens=5",
        "stream": True,
        "messages": [{"role": "user", "content": "benchmark"}],
    }
    samples = []
    with httpx.Client(base_url=base_url, timeout=10) as http:
        for i in range(calls + 3):
            started = time.perf_counter()
            for _ in range(agents):
                with http.stream("POST", "/chat/completions", json=body) as r:
                    r.read()
            if i >= 3:  # warm-up
                samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure(config: str, runs: int, chains: list[str]) -> dict[str, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = config_env(config, tmp_path / "data")
        model_port, web_port = free_port(), free_port()
        env["LOCAL_MODEL_URL"] = f"http://127.0.0.1:{model_port}/v1"
        reset_database(env)
        manage(env, "migrate", "-v0")
        (tmp_path / "chains.yaml").write_text(CHAINS)
        manage(env, "loadchains", str(tmp_path / "chains.yaml"))
        key = manage(
            env,
            "createapikey",
            "bench",
            "--runs-per-minute",
            "1000000",
            "--requests-per-minute",
            "10000000",
        )
        base = f"http://127.0.0.1:{web_port}"
        with processes(
            [PY, "-m", "agentsvc.demo_model_server", "--port", str(model_port)],
            [
                PY,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(web_port),
                "agentsvc.asgi:application",
            ],
            executor_command(),
            env=env,
            log_dir=tmp_path,
        ):
            wait_http(f"{base}/healthz")
            results: dict[str, dict[str, list[float]]] = {}
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as http:
                time.sleep(2)  # let the executor settle
                for chain in chains:
                    server, client = [], []
                    for i in range(runs + 5):
                        started = time.perf_counter()
                        r = http.post(
                            f"/api/v1/chains/{chain}/runs", json={"input": {"topic": f"run {i}"}}
                        )
                        assert r.status_code == 202, r.text
                        run_id = r.json()["run_id"]
                        while True:
                            body = http.get(f"/api/v1/runs/{run_id}").json()
                            if body["status"] not in ("queued", "running"):
                                break
                            time.sleep(0.005)
                        elapsed = (time.perf_counter() - started) * 1000
                        assert body["status"] == "completed", body
                        if i >= 5:  # warm-up
                            client.append(elapsed)
                            server.append(ms_between(body["created_at"], body["finished_at"]))
                    model = model_ms(env["LOCAL_MODEL_URL"], 1 if chain == "one" else 3)
                    results[chain] = {"server": server, "client": client, "model": model}
            return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--configs", default="embedded,production")
    parser.add_argument("--chains", default="one,three")
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    exit_on_sigterm()
    report = {}
    for config in args.configs.split(","):
        report[config] = measure(config, args.runs, args.chains.split(","))
    write_json(args.json, report)
    print(f"\nEnd-to-end run time, zero-latency model, {args.runs} runs each, ms")
    print(f"{'config':<11} {'chain':<6} {'measure':<7} result")
    for config, chains in report.items():
        for chain, m in chains.items():
            for what, values in m.items():
                print(f"{config:<11} {chain:<6} {what:<7} {summary(values)}")


if __name__ == "__main__":
    main()
