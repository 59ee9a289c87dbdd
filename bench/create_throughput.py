"""Run creation under load: POST /runs at 64 concurrent connections, against references measured
in the same run on the same server (daphne, one process each):

  hello          a plain ASGI hello-world: the server floor
  durable        validate + INSERT run and queue entry in one transaction (bench/refs)
  seed-fastapi   the seed article's pattern: in-memory dict + BackgroundTasks (0.5 s agent)
  agentsvc       POST /api/v1/chains/bench/runs, PostgreSQL + Redis, no idempotency key
  agentsvc+key   the same with a fresh Idempotency-Key on every request
  agentsvc x2    the create on `manage.py web --processes 2` (two daphne processes, one port)
  get-run        GET /api/v1/runs/{id} against the durable app's GET /runs/{id} (one SELECT)
  cpu            CPU time of the agentsvc process per create, one connection

    .venv/bin/python bench/create_throughput.py [--duration 20] [--burst 60] [--connections 64]

Needs `wrk` (Debian package wrk). No worker runs: accepted runs stay queued.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PY,
    ROOT,
    config_env,
    exit_on_sigterm,
    free_port,
    manage,
    processes,
    reset_database,
    wait_http,
    write_json,
)

BODY = json.dumps({"input": {"topic": "benchmark"}})
CHAINS = """
chains:
  - name: bench
    input_schema: {type: object, required: [topic], properties: {topic: {type: string}}}
    agents:
      - {name: a, provider: local, model: "fake?tokens=5", prompt: "{{ input.topic }}"}
"""


def wrk(
    url: str, path: str, body: str, duration: int, connections: int, key: str = "", prefix: str = ""
) -> dict:
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(ROOT / "bench" / "post.lua"),
        url,
        "--",
        path,
        body,
        key,
    ]
    if prefix:
        args.append(prefix)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p50": ms("50"),
        "p99": ms("99"),
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(x) for x in errors.groups()) if errors else 0),
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(duration: int, burst: int, connections: int) -> dict:
    """Each reference for `duration` seconds; agentsvc for `burst` seconds in 10 s windows (its
    p99 is the worst window's, and `p99_spread` the worst over the best: 1.0 is flat)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = config_env("production", tmp_path / "data")
        env["QUEUE_MAX"] = "100000000"
        reset_database(env)
        ref_env = dict(env)
        ref_env["REF_DATABASE_URL"] = env["DATABASE_URL"]
        manage(env, "migrate", "-v0")
        (tmp_path / "chains.yaml").write_text(CHAINS)
        manage(env, "loadchains", str(tmp_path / "chains.yaml"))
        key = manage(
            env,
            "createapikey",
            "bench",
            "--requests-per-minute",
            "100000000",
            "--runs-per-minute",
            "100000000",
            "--tokens-per-minute",
            "2000000000",
            "--max-active-runs",
            "100000000",
        )
        ports = {
            name: free_port() for name in ("hello", "durable", "seed", "agentsvc", "agentsvc2")
        }
        daphne = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p"]
        with processes(
            [*daphne, str(ports["hello"]), "bench.refs.hello:app"],
            [*daphne, str(ports["durable"]), "bench.refs.durable_accept:app"],
            [*daphne, str(ports["seed"]), "bench.refs.seed_fastapi:app"],
            [*daphne, str(ports["agentsvc"]), "agentsvc.asgi:application"],
            [PY, "manage.py", "web", "--processes", "2", "--port", str(ports["agentsvc2"])],
            env=ref_env,
            log_dir=tmp_path,
        ) as procs:
            for name, port in ports.items():
                try:
                    wait_http(
                        f"http://127.0.0.1:{port}/healthz"
                        if name.startswith("agentsvc")
                        else f"http://127.0.0.1:{port}/"
                    )
                except RuntimeError:
                    for log in sorted(tmp_path.glob("proc*.log")):
                        print(log.name, log.read_text()[-2000:], file=sys.stderr)
                    raise
            url = "http://127.0.0.1:{}".format
            runs_path = "/api/v1/chains/bench/runs"
            paths = {"hello": "/", "durable": "/", "seed": "/agent/tasks", "agentsvc": runs_path}
            paths["agentsvc2"] = runs_path
            for name, path in paths.items():  # warm-up: connections, pools, first imports
                wrk(url(ports[name]), path, BODY, 2, connections, key)
            run_id = httpx.post(
                url(ports["agentsvc"]) + runs_path,
                content=BODY,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            ).json()["run_id"]
            ref_id = httpx.post(url(ports["durable"]) + "/", content=BODY).json()["run_id"]
            c, d = connections, duration
            results = {
                "hello": wrk(url(ports["hello"]), "/", BODY, d, c),
                "durable": wrk(url(ports["durable"]), "/", BODY, d, c),
                "seed-fastapi": wrk(url(ports["seed"]), "/agent/tasks", BODY, d, c),
            }
            windows = [
                wrk(url(ports["agentsvc"]), runs_path, BODY, min(10, burst), c, key)
                for _ in range(max(1, burst // 10))
            ]
            results["agentsvc"] = {
                "rps": statistics.mean(w["rps"] for w in windows),
                "p50": statistics.median(w["p50"] for w in windows),
                "p99": max(w["p99"] for w in windows),
                "p99_spread": max(w["p99"] for w in windows) / min(w["p99"] for w in windows),
                "errors": sum(w["errors"] for w in windows),
                "windows": windows,
            }
            results["agentsvc+key"] = wrk(
                url(ports["agentsvc"]), runs_path, BODY, d, c, key, uuid.uuid4().hex[:8]
            )
            results["agentsvc x2"] = wrk(url(ports["agentsvc2"]), runs_path, BODY, d, c, key)
            results["get-run durable"] = wrk(url(ports["durable"]), f"/runs/{ref_id}", "", d, c)
            results["get-run agentsvc"] = wrk(
                url(ports["agentsvc"]), f"/api/v1/runs/{run_id}", "", d, c, key
            )
            agentsvc_pid = procs[3].pid
            before = cpu_seconds(agentsvc_pid)
            one = wrk(url(ports["agentsvc"]), runs_path, BODY, d, 1, key)
            one["cpu_ms"] = (cpu_seconds(agentsvc_pid) - before) * 1000 / (one["rps"] * d)
            results["agentsvc c1"] = one
    results["config"] = {"duration_s": duration, "burst_s": burst, "connections": connections}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=20, help="seconds per reference")
    parser.add_argument("--burst", type=int, default=60, help="seconds of agentsvc, 10 s windows")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    exit_on_sigterm()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    results = measure(args.duration, args.burst, args.connections)
    write_json(args.json, results)
    base = results["durable"]["rps"]
    print(
        f"\nRun creation, {args.connections} connections, {args.duration} s per reference, "
        f"{args.burst} s of agentsvc, one daphne process per server"
    )
    print(
        f"{'server':<17} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs durable':>10}"
    )
    for name, r in results.items():
        if name == "config":
            continue
        print(
            f"{name:<17} {r['rps']:8.0f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:7d} "
            f"{r['rps'] / base:9.2f}x"
            + (f"  {r['cpu_ms']:.2f} ms CPU each" if "cpu_ms" in r else "")
        )


if __name__ == "__main__":
    main()
