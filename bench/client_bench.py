"""Client benchmark: the Python client's per-call overhead and how fast a cut stream resumes.

    .venv/bin/python bench/client_bench.py [--calls 300] [--drops 40]

Starts the fake model server, daphne and an executor against PostgreSQL + Redis (databases of its
own: BENCH_DATABASE_URL / BENCH_REDIS_URL override), and a TCP proxy in this process.
  get overhead: `client.runs.get` vs a bare `httpx.Client.get` of the same run, ms per call.
  resume gap:   a run streams 400 tokens 20 ms apart through the proxy; every 8th event the proxy
                cuts the connection; the figure is the time from the cut to the next event the
                client yields (reconnect with Last-Event-ID + replay), ms. Every event must arrive
                exactly once, in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agentsvc_client import Client

from bench.common import (
    PY,
    config_env,
    executor_command,
    free_port,
    manage,
    processes,
    reset_database,
    summary,
    wait_http,
)
from tests.fakes.tcp_proxy import TcpProxy

CHAINS = """
chains:
  - name: long
    agents:
      - name: a
        provider: local
        model: "fake?tokens=400&latency_ms=20"
        prompt: "{{ input.topic }}"
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--drops", type=int, default=40)
    args = p.parse_args()
    os.environ.setdefault(
        "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentsvc_client_bench"
    )
    os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = config_env("production", tmp_path / "data")
        model_port, web_port = free_port(), free_port()
        env["LOCAL_MODEL_URL"] = f"http://127.0.0.1:{model_port}/v1"
        reset_database(env)
        manage(env, "migrate", "-v0")
        (tmp_path / "chains.yaml").write_text(CHAINS)
        manage(env, "loadchains", str(tmp_path / "chains.yaml"))
        key = manage(env, "createapikey", "bench", "--requests-per-minute", "100000")
        base = f"http://127.0.0.1:{web_port}"
        daphne = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port)]
        with processes(
            [PY, "-m", "agentsvc.demo_model_server", "--port", str(model_port)],
            [*daphne, "agentsvc.asgi:application"],
            executor_command(),
            env=env,
            log_dir=tmp_path,
        ):
            wait_http(f"{base}/healthz")
            time.sleep(2)
            overhead = get_overhead(base, key, args.calls)
            gaps = resume_gaps(base, key, args.drops)
    print(f"\nClient benchmark (2-core machine), ms; {args.calls} calls, {len(gaps)} cuts")
    print(f"{'measure':<22} result")
    print(f"{'httpx get':<22} {summary(overhead['httpx'])}")
    print(f"{'client.runs.get':<22} {summary(overhead['client'])}")
    print(f"{'resume after a cut':<22} {summary(gaps)}")


def get_overhead(base: str, key: str, calls: int) -> dict[str, list[float]]:
    with (
        Client(base, key) as client,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http,
    ):
        run_id = client.runs.create("long", {"topic": "x"})["run_id"]
        client.runs.cancel(run_id)
        times: dict[str, list[float]] = {"httpx": [], "client": []}
        for i in range(calls + 20):
            for name, call in (
                ("httpx", lambda: http.get(f"/api/v1/runs/{run_id}").json()),
                ("client", lambda: client.runs.get(run_id)),
            ):
                started = time.perf_counter()
                call()
                if i >= 20:
                    times[name].append((time.perf_counter() - started) * 1000)
        return times


def resume_gaps(base: str, key: str, drops: int) -> list[float]:
    port = base.rsplit(":", 1)[1]
    gaps: list[float] = []
    while len(gaps) < drops:
        proxy = TcpProxy(("127.0.0.1", int(port)))
        try:
            with Client(proxy.url, key, backoff_base=0.01) as client:
                run_id = client.runs.create("long", {"topic": "resume"})["run_id"]
                seqs, cut_at = [], None
                for event in client.runs.stream(run_id):
                    if cut_at is not None:
                        gaps.append((time.perf_counter() - cut_at) * 1000)
                        cut_at = None
                    seqs.append(event.seq)
                    if len(seqs) % 8 == 0 and len(gaps) < drops and not event.is_terminal:
                        proxy.drop_all()
                        cut_at = time.perf_counter()
                assert seqs == list(range(1, len(seqs) + 1)), "a duplicate or a gap"
        finally:
            proxy.close()
    return gaps


if __name__ == "__main__":
    main()
