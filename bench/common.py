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
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# Benchmarks recreate their database and empty their Redis database: keep them apart from
# anything else on the machine.
DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentsvc_bench"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


# The executor's PostgreSQL sessions carry this application_name (libpq's PGAPPNAME), so
# pg_stat_activity tells its connections from those of daphne and of the benchmark itself.
EXECUTOR_APP = "agentsvc-executor"


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


def executor_command(concurrency: int | None = None, stats: Path | None = None) -> list[str]:
    """The command that starts one executor (`manage.py executor`); with `stats`, through
    bench/executor_probe.py, which runs the same command and samples its counters to that file."""
    extra = ["--concurrency", str(concurrency)] if concurrency else []
    if stats is None:
        return [PY, "manage.py", "executor", *extra]
    return [PY, str(ROOT / "bench" / "executor_probe.py"), "--stats", str(stats), *extra]


def executor_env(env: dict[str, str]) -> dict[str, str]:
    return dict(env, PGAPPNAME=EXECUTOR_APP)


def read_samples(path: Path) -> list[dict]:
    """The lines bench/executor_probe.py wrote so far (a partial last line is skipped)."""
    samples = []
    if path.exists():
        for line in path.read_text().splitlines():
            with suppress(ValueError):
                samples.append(json.loads(line))
    return samples


def loop_window(samples: list[dict], start: float, end: float) -> dict:
    """From bench/executor_probe.py samples between two wall-clock times: the event loop's lag
    (p50, p99, max ms) and the shares of the time its thread (the process's main thread) spent
    on a CPU and waiting on a run queue for one (the rest it slept, waiting for I/O); the
    process's CPU (all threads), in cores."""
    inside = [s for s in samples if start <= s["t"] <= end and "main_wait_s" in s]
    lags = [s["loop_lag_ms"] for s in inside if "loop_lag_ms" in s]
    if len(inside) < 2 or not lags:
        return {}
    first, last = inside[0], inside[-1]
    span = last["t"] - first["t"]
    return {
        "loop_lag_p50_ms": statistics.median(lags),
        "loop_lag_p99_ms": pct(lags, 99),
        "loop_lag_max_ms": max(lags),
        "loop_on_cpu": (last["main_cpu_s"] - first["main_cpu_s"]) / span,
        "loop_waiting_for_cpu": (last["main_wait_s"] - first["main_wait_s"]) / span,
        "process_cpu": (last["cpu_s"] - first["cpu_s"]) / span,
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class PgSampler:
    """Samples, from the maintenance database (so its own queries are not counted), the commits
    of the bench database (pg_stat_database.xact_commit) and the connections to it held by
    processes with application_name `app`, every `interval` seconds, in a thread."""

    def __init__(self, database_url: str, app: str = EXECUTOR_APP, interval: float = 0.25):
        import threading

        self.url = database_url.rsplit("/", 1)[0] + "/postgres"
        self.db = database_url.rsplit("/", 1)[1]
        self.app = app
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (time, xact_commit, connections)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PgSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = %s),"
                    " (SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND application_name = %s)",
                    [self.db, self.db, self.app],
                ).fetchone()
                self.samples.append((time.time(), int(row[0] or 0), int(row[1])))
                self._stop.wait(self.interval)

    def window(self, start: float, end: float) -> dict:
        """Commits per second and connections (max, median) between two wall-clock times.
        PostgreSQL publishes a backend's counts about once a second: use windows of seconds."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {"commits_per_s": float("nan"), "connections_max": 0, "connections_p50": 0}
        (t0, c0, _), (t1, c1, _) = inside[0], inside[-1]
        conns = [s[2] for s in inside]
        return {
            "seconds": t1 - t0,
            "commits_per_s": (c1 - c0) / (t1 - t0),
            "connections_max": max(conns),
            "connections_p50": statistics.median(conns),
        }


def in_flight_timeline(intervals: list[tuple[float, float]]) -> list[tuple[float, int]]:
    """[(time, runs in flight from then on)] from (started, finished) pairs."""
    points = sorted([(s, 1) for s, _ in intervals] + [(f, -1) for _, f in intervals])
    timeline, level = [], 0
    for t, d in points:
        level += d
        timeline.append((t, level))
    return timeline


def in_flight_stats(intervals: list[tuple[float, float]]) -> dict:
    """Peak and time-averaged runs in flight over [first start, last finish]."""
    if not intervals:
        return {"peak": 0, "average": 0.0}
    span = max(f for _, f in intervals) - min(s for s, _ in intervals)
    busy = sum(f - s for s, f in intervals)
    peak = max(level for _, level in in_flight_timeline(intervals))
    return {"peak": peak, "average": busy / span if span > 0 else float("nan")}


def model_command(port: int) -> list[str]:
    """The fake model server (agentsvc/demo_model_server.py) with a listen backlog for a thousand
    connections opened at once (the standard library's default is 5: the rest would wait for a
    SYN retransmit, a second or more, which is not the model's latency)."""
    code = (
        "import sys; from agentsvc.demo_model_server import FakeModelServer as S; "
        "S.request_queue_size = 4096; S(('127.0.0.1', int(sys.argv[1]))).serve_forever()"
    )
    return [PY, "-c", code, str(port)]


def pyspy_record(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """py-spy (if installed next to this Python) sampling `pid` for `seconds`, raw format."""
    spy = Path(PY).parent / "py-spy"
    if not spy.exists():
        return None
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
         "--format", "raw", "--threads", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def pyspy_top(path: Path, n: int = 12) -> dict:
    """From a raw py-spy profile: samples per thread kind, and per kind the functions with the
    most samples, inclusive (function (file)) and self."""
    from collections import Counter, defaultdict

    kinds: Counter = Counter()
    incl: dict[str, Counter] = defaultdict(Counter)
    own: dict[str, Counter] = defaultdict(Counter)

    def name(frame: str) -> str:
        func, _, where = frame.partition(" (")
        return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})"

    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1].rstrip(")")
        kind = thread.rstrip("_0123456789") or thread
        kinds[kind] += int(count)
        for f in {name(f) for f in frames[1:]}:
            incl[kind][f] += int(count)
        own[kind][name(frames[-1])] += int(count)
    return {
        "samples": dict(kinds),
        "inclusive": {k: incl[k].most_common(n) for k in kinds},
        "self": {k: own[k].most_common(n) for k in kinds},
    }


# --- Runs held for stream benchmarks (stream_bench.py, interop_bench.py) ---------------------
HELD = "bench-held"  # no executor's id: executors neither claim, beat for nor recover these


def idle_runs(key, chain, n: int) -> list[str]:
    """Runs no executor will take: `running`, held by no executor, with no heartbeat or
    deadline (so neither an executor's lost-run check nor the keeper, which is off, moves
    them), and only their `run.queued` event. Their streams stay open and silent until the
    benchmark queues one (`enqueue`). Django must be set up."""
    from runs.models import Run, RunEvent, RunStatus
    from runs.timefmt import iso

    runs = []
    for _ in range(n):
        run = Run.objects.create(
            owner=key.owner, api_key=key, chain=chain, input={}, agents_total=1, last_seq=1,
            status=RunStatus.RUNNING, worker=HELD,
        )  # fmt: skip
        RunEvent.objects.create(
            run=run, seq=1, type="run.queued", created_at=run.created_at,
            data={"run_id": str(run.id), "seq": 1, "ts": iso(run.created_at)},
        )  # fmt: skip
        runs.append(str(run.id))
    return runs


def enqueue(run_id: str) -> None:
    """Hand a held run to the queue and wake the executors, as `run_create` does on commit."""
    from runs.events import RUN_QUEUED
    from runs.models import Run, RunStatus
    from runs.wakeup import wakeup_publish

    run = Run.objects.filter(pk=run_id, worker=HELD)
    owner_id = run.values_list("owner_id", flat=True).get()
    run.update(status=RunStatus.QUEUED, worker="")
    wakeup_publish(run_id=run_id, owner_id=owner_id, seq=1, event=RUN_QUEUED)
