"""Helpers for benchmarks: start the service's processes in a given configuration, summarise
samples, and hand results to `bench/suite.py` (every script takes `--json PATH`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# Benchmarks recreate their database and empty their Redis database: keep them apart from
# anything else on the machine.
DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentsvc_bench"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def exit_on_sigterm() -> None:
    """Unwind on SIGTERM (from `timeout`, or the suite stopping a scenario) as on an error, so
    the processes a benchmark started are stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_env(config: str, data_dir: Path) -> dict[str, str]:
    """Environment for `embedded` (SQLite, ORM broker) or `production` (PostgreSQL + Redis)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "DATA_DIR", "Q_CLUSTER_NAME")
    }
    env["DATA_DIR"] = str(data_dir)
    env["LOG_LEVEL"] = "WARNING"
    env["Q_CLUSTER_NAME"] = f"bench-{os.getpid()}"
    # The keeper would re-enqueue the runs a benchmark holds queued on purpose.
    env["Q_SCHEDULER"] = "false"
    if config == "production":
        env["DATABASE_URL"] = DATABASE_URL
        env["REDIS_URL"] = REDIS_URL
        env["SECRET_KEY"] = "bench-secret"
    return env


def reset_database(env: dict[str, str]) -> None:
    if "DATABASE_URL" in env:
        import psycopg

        url = env["DATABASE_URL"]
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        import redis

        redis.Redis.from_url(env["REDIS_URL"]).flushdb()


def manage(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [PY, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def processes(*commands: list[str], env: dict[str, str], log_dir: Path):
    procs = []
    try:
        for i, cmd in enumerate(commands):
            log = (log_dir / f"proc{i}.log").open("wb")
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no samples."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):7.1f}  p90 {pct(values, 90):7.1f}  "
        f"p99 {pct(values, 99):7.1f}"
    )


def write_json(path: str | None, results: dict) -> None:
    """Where `bench/suite.py` reads a script's results (`--json PATH`)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1))
