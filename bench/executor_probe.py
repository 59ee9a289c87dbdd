"""`manage.py executor`, with its counters sampled to a file for the benchmarks.

    .venv/bin/python bench/executor_probe.py --stats PATH [--concurrency N] [--interval 0.1]

Runs the very command (`call_command("executor")`: same settings, signals, drain) and, from a
thread of its own, appends one JSON line to PATH every `--interval` seconds and a last one when
the command returns: wall-clock time `t`, `in_flight` (runs the executor holds), `started_runs`,
`commits` and `events_written` (its group commit, `executor.writer`), the process's
`rss_kb` and `cpu_s` (user + system), `main_cpu_s` and `main_wait_s` (the main thread's, the
event loop's, time on a CPU and waiting on a run queue for one: /proc/self/schedstat), and
`loop_lag_ms`: how late the event loop ran the callback the previous sample scheduled on it
(call_soon_threadsafe), or how long it has waited so far. Reading a counter and the length of
a dict from another thread is safe under the GIL; the sampling costs the process well under 1 %
of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsvc.settings")


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def schedstat() -> tuple[float, float]:
    """The main thread's (the event loop's) seconds on a CPU and waiting for one."""
    try:
        on_cpu, waiting, _ = Path("/proc/self/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", required=True, help="append samples (JSON lines) here")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.management import call_command

    from runs.execution import executor as module

    executors: list = []
    init = module.Executor.__init__

    def tracked_init(self, *a, **kw):
        init(self, *a, **kw)
        executors.append(self)

    module.Executor.__init__ = tracked_init
    loops: list = []
    serve = module.Executor.serve

    async def tracked_serve(self, *a, **kw):
        import asyncio

        loops.append(asyncio.get_running_loop())
        return await serve(self, *a, **kw)

    module.Executor.serve = tracked_serve
    lag: dict = {"scheduled": None, "ran": None}

    def ran() -> None:
        lag["ran"] = time.monotonic()

    out = Path(args.stats).open("a", buffering=1)  # noqa: SIM115 (closed in the finally)
    done = threading.Event()

    def sample() -> None:
        e = executors[0] if executors else None
        times = os.times()
        on_cpu, waiting = schedstat()
        row = {
            "t": time.time(),
            "rss_kb": rss_kb(),
            "cpu_s": times.user + times.system,
            "main_cpu_s": on_cpu,
            "main_wait_s": waiting,
        }
        if loops:
            now = time.monotonic()
            scheduled, done_at = lag["scheduled"], lag["ran"]
            if scheduled is not None:  # still waiting: how long so far
                late = (done_at if done_at is not None else now) - scheduled
                row["loop_lag_ms"] = round(late * 1000, 1)
            if scheduled is None or done_at is not None:
                lag["scheduled"], lag["ran"] = now, None
                loops[0].call_soon_threadsafe(ran)
        if e is not None:
            row.update(
                in_flight=len(e.runs),
                started_runs=e.started_runs,
                commits=e.writer.commits,
                events_written=e.writer.events_written,
            )
        out.write(json.dumps(row) + "\n")

    def loop() -> None:
        while not done.wait(args.interval):
            sample()

    threading.Thread(target=loop, daemon=True, name="probe").start()
    try:
        call_command("executor", concurrency=args.concurrency)
    finally:
        done.set()
        sample()
        out.close()


if __name__ == "__main__":
    main()
