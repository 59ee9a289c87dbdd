"""The benchmark suite: every scenario in a bounded time, one table.

    make bench                                   # about 14 minutes on 2 loaded cores
    make bench BENCH_ARGS=--quick                # a smoke run, about 4 minutes
    .venv/bin/python bench/suite.py [--quick] [--only create,overhead,...]

Each scenario is one of the scripts next to this file, run as its own process (each configures
Django for itself) with `--json`; this file only chooses their sizes and turns their results into
one markdown table: scenario | metric | agentsvc | reference | ratio | target | met?
The machine is shared, so every ratio is against a reference measured in the same run, and the
load average is recorded at the start and the end. The table goes to stdout and to
bench/results/latest.md; everything measured to bench/results/latest.json, each script's output
to bench/results/<scenario>.log.

Needs PostgreSQL and Redis (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/
agentsvc_bench, recreated; BENCH_REDIS_URL, default redis://127.0.0.1:6379/13, emptied) and wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, ROOT, exit_on_sigterm, pct

RESULTS = ROOT / "bench" / "results"

# name -> (script, full-run arguments, --quick arguments, time limit in seconds)
SCENARIOS = {
    "create": (
        "create_throughput.py",
        ["--duration", "10", "--burst", "60"],
        ["--duration", "5", "--burst", "20"],
        300,
    ),
    "overhead": (
        "run_latency.py",
        ["--runs", "50", "--chains", "one"],
        ["--runs", "20", "--chains", "one"],
        240,
    ),
    "streams": (
        "stream_bench.py",
        ["--runs", "30", "--hold", "1000", "--idle", "5000", "--fanout", "0"],
        ["--runs", "10", "--hold", "1000", "--idle", "1000", "--fanout", "0"],
        300,
    ),
    "throughput": ("throughput_bench.py", ["--runs", "1000"], ["--runs", "300"], 240),
    "webhooks": (
        "webhook_bench.py",
        ["--deliveries", "1000", "--runs", "100"],
        ["--deliveries", "300", "--runs", "30"],
        240,
    ),
    "inflight": (
        "inflight_bench.py",
        ["--runs", "1000", "--levels", "10,100,1000", "--waves", "3"],
        ["--runs", "300", "--levels", "10,100,300", "--waves", "2"],
        480,
    ),
    "cancel": (
        "cancel_bench.py",
        ["--runs", "100", "--rounds", "3"],
        ["--runs", "40", "--rounds", "1"],
        240,
    ),
    "tools": (
        "tools_bench.py",
        ["--runs", "1000", "--samples", "30"],
        ["--runs", "300", "--samples", "15"],
        420,
    ),
    "langgraph": ("langgraph_bench.py", ["--runs", "1000"], ["--runs", "300"], 300),
    "interop": (
        "interop_bench.py",
        ["--window", "10", "--rounds", "2", "--runs", "30", "--hold", "1000"],
        ["--window", "5", "--rounds", "1", "--runs", "10", "--hold", "200"],
        300,
    ),
    "waits": (
        "waits_bench.py",
        ["--runs", "10000", "--rate", "100"],
        ["--runs", "2000", "--rate", "100", "--warmup", "200"],
        900,
    ),
}


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    ram_gib = round(mem_kb / 2**20, 1)
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gib": ram_gib, "commit": commit}


def run_scenario(name: str, quick: bool) -> dict:
    script, full, short, limit = SCENARIOS[name]
    out = RESULTS / f"{name}.json"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    args = [PY, str(ROOT / "bench" / script), *(short if quick else full), "--json", str(out)]
    with (RESULTS / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=limit)
            error = f"exit status {code}" if code else ""
        except subprocess.TimeoutExpired:
            error = f"over its {limit} s limit"
        finally:
            if proc.poll() is None:  # timed out, or the suite was stopped: let it clean up
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    seconds = time.monotonic() - started
    if not error and out.exists():
        return {"seconds": seconds, **json.loads(out.read_text())}
    return {"seconds": seconds, "error": error or "no results written"}


# --- the table -----------------------------------------------------------------------------------
def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def ms(p50: float, p99: float) -> str:
    return f"{p50:,.1f} / {p99:,.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "—"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def rows(r: dict) -> list[tuple]:
    """(scenario, metric, agentsvc, reference, ratio, target, met?) for every result present."""
    out: list[tuple] = []
    failed = [(name, res["error"]) for name, res in r.items() if "error" in res]
    c = r.get("create", {})
    if "agentsvc" in c:
        a, d, seed, hello = c["agentsvc"], c["durable"], c["seed-fastapi"], c["hello"]
        key = c["agentsvc+key"]
        conns = c["config"]["connections"]
        burst = c["config"]["burst_s"]
        two, c1 = c["agentsvc x2"], c["agentsvc c1"]
        got, floor_get = c["get-run agentsvc"], c["get-run durable"]
        out += [
            ("1 run creation", f"req/s, {conns} clients, {burst} s burst; ref: durable accept",
             num(a["rps"]), num(d["rps"]), ratio(a["rps"], d["rps"]), "≥ 0.5x (aim 0.8x)",
             met(a["rps"] >= 0.5 * d["rps"])),
            ("1 run creation", "latency p50 / p99 ms; ref: durable accept",
             ms(a["p50"], a["p99"]), ms(d["p50"], d["p99"]), ratio(a["p99"], d["p99"]),
             "p99 ≤ 150 ms", met(a["p99"] <= 150)),
            ("1 run creation", "p99 worst / best 10 s window of the burst",
             f"{a['p99_spread']:.2f}x", "", "", "flat (≤ 2x)", met(a["p99_spread"] <= 2)),
            ("1 run creation", "req/s; ref: the seed's FastAPI pattern",
             num(a["rps"]), num(seed["rps"]), ratio(a["rps"], seed["rps"]), "≥ 3x",
             met(a["rps"] >= 3 * seed["rps"])),
            ("1 run creation", "req/s with Idempotency-Key; ref: durable accept",
             num(key["rps"]), num(d["rps"]), ratio(key["rps"], d["rps"]), "", ""),
            ("1 run creation", "req/s, two web processes on one port; ref: one",
             num(two["rps"]), num(a["rps"]), ratio(two["rps"], a["rps"]), "≥ 1.6x",
             met(two["rps"] >= 1.6 * a["rps"])),
            ("1 run creation", "CPU ms of the web process per create, 1 connection",
             f"{c1['cpu_ms']:.2f}", "", "", "", ""),
            ("1 run creation", "GET /runs/{id} req/s; ref: durable app's status GET",
             num(got["rps"]), num(floor_get["rps"]), ratio(got["rps"], floor_get["rps"]),
             "≥ 0.5x", met(got["rps"] >= 0.5 * floor_get["rps"])),
        ]  # fmt: skip
    for config, target in (("embedded", 250), ("production", 10)):
        one = r.get("overhead", {}).get(config, {}).get("one")
        if one:
            model = statistics.median(one["model"])
            overhead = [s - model for s in one["server"]]
            p50 = statistics.median(overhead)
            label = "embedded (SQLite)" if config == "embedded" else "production (Redis)"
            out.append(
                ("2 platform overhead per run", f"ms p50 / p99, {label}; ref: model time",
                 ms(p50, pct(overhead, 99)), f"{model:.1f}", "", f"p50 ≤ {target} ms",
                 met(p50 <= target))
            )  # fmt: skip
    s = r.get("streams", {})
    for proto, target in (("sse", 20), ("ws", None)):
        if proto in s:
            x = s[proto]
            p99 = x["token_to_client_p99_ms"]
            out.append(
                ("3 token → client", f"ms p50 / p99, {proto.upper()}, "
                 f"{x['open_streams']:,} streams open",
                 ms(x["token_to_client_p50_ms"], p99), "", "",
                 f"p99 ≤ {target} ms" if target else "", met(p99 <= target) if target else "")
            )  # fmt: skip
    if "idle" in s:
        i = s["idle"]
        out += [
            ("4 idle streams", "SSE streams held by one web process", num(i["open"]), "", "",
             "≥ 5,000", met(i["open"] >= 5000)),
            ("4 idle streams", "memory per stream, KB (RSS growth / streams)",
             num(i["kb_per_stream"], 1), "", "", "≤ 100 KB", met(i["kb_per_stream"] <= 100)),
        ]  # fmt: skip
    t = r.get("throughput", {})
    if "executor" in t:
        x = t["executor"]
        out += [
            ("5 executor throughput", f"runs/s, 1 executor process, zero-latency model "
             f"({t['runs']:,} runs queued first)", num(x["runs_per_s"]), "", "", "≥ 300",
             met(x["runs_per_s"] >= 300)),
            ("5 executor throughput", "runs in flight avg / peak; group commits, events each",
             f"{x['in_flight_average']:.0f} / {x['in_flight_peak']}; {x['group_commits']}, "
             f"{x['events_per_group_commit']:.0f}", "", "", "", ""),
            ("5 executor throughput", "database commits per run; SQL statements per run alone",
             f"{x['db_commits_per_run']:.2f}; {t['queries_per_run_alone']:.0f}", "", "", "",
             ""),
        ]  # fmt: skip
    h = r.get("webhooks", {})
    if "backlog_per_s" in h:
        k = h.get("concurrency", 8)
        out += [
            ("6 webhooks", f"deliveries/s, 1 executor's pump ({k} threads), a backlog",
             num(h["backlog_per_s"]), "", "", "≥ 300", met(h["backlog_per_s"] >= 300)),
            ("6 webhooks", "deliveries/s, runs ending (run and delivery, 1 executor)",
             num(h["run_ends_per_s"]), "", "", "≥ 300", met(h["run_ends_per_s"] >= 300)),
            ("6 webhooks", "run end (finished_at) → receipt ms, p50 / p95",
             ms(h["latency_p50_ms"], h["latency_p95_ms"]), "", "", "", ""),
        ]  # fmt: skip
    if "hello" in c:
        out.append(
            ("7 server floor", "req/s; ref: plain ASGI hello-world, same server",
             num(c["agentsvc"]["rps"]), num(hello["rps"]),
             ratio(c["agentsvc"]["rps"], hello["rps"]), "", "")
        )  # fmt: skip
    f = r.get("inflight", {})
    if "agentsvc" in f and "seed" in f:
        a, seed, cfg = f["agentsvc"], f["seed"], f["config"]
        shape = (
            f"{a['runs']:,} runs ({cfg['agents']} agents x {cfg['tokens']} tokens at "
            f"{cfg['latency_ms']} ms) through the API, 1 executor"
        )
        out += [
            ("8 runs in flight", f"drain s, first create → last done, {shape}; ref: seed "
             "FastAPI pattern", num(a["drain_s"], 1), num(seed["drain_s"], 1),
             ratio(a["drain_s"], seed["drain_s"]), "≤ 1.2x",
             met(a["drain_s"] <= 1.2 * seed["drain_s"])),
            ("8 runs in flight", "runs created/s, 16 connections; ref: seed",
             num(a["create_rps"]), num(seed["create_rps"]), ratio(a["create_rps"],
             seed["create_rps"]), "", ""),
            ("8 runs in flight", "last create → last done s; ref: seed",
             num(a["after_last_create_s"], 1), num(seed["after_last_create_s"], 1),
             ratio(a["after_last_create_s"], seed["after_last_create_s"]), "", ""),
            ("8 runs in flight", "start latency ms p50 / p99 (started_at - created_at); ref: seed",
             ms(a["start_latency_p50_ms"], a["start_latency_p99_ms"]),
             ms(seed["start_latency_p50_ms"], seed["start_latency_p99_ms"]), "", "p99 ≤ 1,000",
             met(a["start_latency_p99_ms"] <= 1000)),
            ("8 runs in flight", "run duration ms p50 / p99 (model time "
             f"{cfg['model_s_per_run'] * 1000:,.0f}); ref: seed",
             ms(a["run_duration_p50_ms"], a["run_duration_p99_ms"]),
             ms(seed["run_duration_p50_ms"], seed["run_duration_p99_ms"]), "", "", ""),
            ("8 runs in flight", "runs in flight avg / peak; ref: seed",
             f"{a['in_flight_average']:.0f} / {a['in_flight_peak']}",
             f"{seed['in_flight_average']:.0f} / {seed['in_flight_peak']}", "", "", ""),
            ("8 runs in flight", "RSS MB idle / peak; ref: seed process",
             f"{a['rss_idle_kb'] / 1024:.0f} / {a['rss_peak_kb'] / 1024:.0f}",
             f"{seed['rss_idle_kb'] / 1024:.0f} / {seed['rss_peak_kb'] / 1024:.0f}", "", "", ""),
            ("8 runs in flight", "RSS KB per run in flight, (peak - idle) / peak; ref: seed",
             num(a["rss_per_run_kb"], 1), num(seed["rss_per_run_kb"], 1),
             ratio(a["rss_per_run_kb"], seed["rss_per_run_kb"]), "≤ 100 KB",
             met(a["rss_per_run_kb"] <= 100)),
            ("8 runs in flight", "executor event loop: lag ms p50 / p99; share of the time its "
             "thread ran on a CPU / waited for one (run queue)",
             f"{ms(a.get('loop_lag_p50_ms', float('nan')), a.get('loop_lag_p99_ms', float('nan')))}"
             f"; {a.get('loop_on_cpu', float('nan')):.0%} / "
             f"{a.get('loop_waiting_for_cpu', float('nan')):.0%}", "", "", "", ""),
            ("8 runs in flight", "PostgreSQL connections of the executor, max; commits/s",
             f"{a.get('connections_max', 0)}; {a.get('commits_per_s', float('nan')):,.0f}", "",
             "", "", ""),
        ]  # fmt: skip
    for level, x in f.get("levels", {}).items():
        out.append(
            ("8 runs in flight", f"at {int(level):,} in flight: PostgreSQL connections max; "
             "commits/s; group commits/s; events/s; run duration ms p50 / p99; RSS KB per run",
             f"{x.get('connections_max', '—')}; {x.get('commits_per_s', float('nan')):,.0f}; "
             f"{x.get('group_commits_per_s', float('nan')):,.1f}; "
             f"{x.get('events_per_s', float('nan')):,.0f}; "
             f"{ms(x['run_duration_p50_ms'], x['run_duration_p99_ms'])}; "
             f"{x['rss_per_run_kb']:.0f}", "", "", "", "")
        )  # fmt: skip
    k = r.get("cancel", {})
    if "all" in k:
        cfg, a = k["config"], k["all"]
        d = k["during_cancels"]
        shape = (
            f"{cfg['runs']} in flight on 1 executor, half streaming, half on a silent model, "
            f"{a['client']['n']} cancels through the API"
        )
        out += [
            ("9 cancellation", f"ms p50 / p99, cancel POST sent → run reads cancelled; {shape}",
             ms(a["client"]["p50_ms"], a["client"]["p99_ms"]), "", "", "p99 ≤ 200 ms",
             met(a["client"]["p99_ms"] <= 200)),
            ("9 cancellation", "ms p50 / p99, finished_at - cancel_requested_at (database); "
             "streaming / silent model",
             f"{ms(k['stream']['server']['p50_ms'], k['stream']['server']['p99_ms'])}; "
             f"{ms(k['silent']['server']['p50_ms'], k['silent']['server']['p99_ms'])}", "", "",
             "p99 ≤ 200 ms", met(a["server"]["p99_ms"] <= 200)),
            ("9 cancellation", "ms p50 / p99: cancel POST round trip; run's end → visible",
             f"{ms(a['post']['p50_ms'], a['post']['p99_ms'])}; "
             f"{ms(a['end_visible']['p50_ms'], a['end_visible']['p99_ms'])}", "", "", "", ""),
            ("9 cancellation", "while cancelling: executor loop lag ms p50 / p99; its thread on "
             "a CPU / waiting for one; CPU of a core, executor / web",
             f"{ms(d['loop_lag_p50_ms'], d['loop_lag_p99_ms'])}; {d['loop_on_cpu']:.0%} / "
             f"{d['loop_waiting_for_cpu']:.0%}; {d['executor_cpu']:.0%} / {d['web_cpu']:.0%}",
             "", "", "", ""),
        ]  # fmt: skip
    t = r.get("tools", {})
    if "drain" in t:
        cfg, d, rd = t["config"], t["drain"], t["round"]
        shape = (
            f"{cfg['runs']:,} runs of 2 agents, the first with one tool call ({cfg['tokens']} "
            f"tokens a model call at {cfg['latency_ms']} ms), queued 250/s, 1 executor"
        )
        out += [
            ("10 tool calls", f"drain s; {shape}; ref: the same calls as plain asyncio.gather",
             num(d["agentsvc_s"], 1), num(d["reference_s"], 1),
             ratio(d["agentsvc_s"], d["reference_s"]), "≤ 1.2x",
             met(d["agentsvc_s"] <= 1.2 * d["reference_s"])),
            ("10 tool calls", "start latency ms p50 / p99 (started_at - created_at)",
             ms(d["start_p50_ms"], d["start_p99_ms"]), "", "", "p99 ≤ 1,000",
             met(d["start_p99_ms"] <= 1000)),
            ("10 tool calls", f"ms per tool round, zero-latency model, {cfg['rounds']} rounds vs "
             "none, medians of runs one at a time; ref: plain asyncio",
             num(rd["agentsvc_per_round_ms"], 2), num(rd["reference_per_round_ms"], 2), "", "",
             ""),
            ("10 tool calls", "overhead per tool round ms (call and result durable), p50",
             num(rd["overhead_per_round_ms"], 2), "", "", "≤ 2 ms",
             met(rd["overhead_per_round_ms"] <= 2)),
        ]  # fmt: skip
    g = r.get("langgraph", {})
    if "agentsvc" in g and "reference" in g:
        a, ref, cfg = g["agentsvc"], g["reference"], g["config"]
        shape = (
            f"{a['runs']:,} runs of a LangGraph graph ({cfg['nodes']} nodes x {cfg['tokens']} "
            f"tokens at {cfg['latency_ms']} ms), 1 executor"
        )
        out += [
            ("11 LangGraph", f"drain s, first created → last done, {shape}; ref: the same "
             "graph's ainvoke gathered in one process", num(a["drain_s"], 1),
             num(ref["drain_s"], 1), ratio(a["drain_s"], ref["drain_s"]), "≤ 1.2x",
             met(a["drain_s"] <= 1.2 * ref["drain_s"])),
            ("11 LangGraph", "run duration ms p50 / p99; ref: ainvoke's",
             ms(a["run_duration_p50_ms"], a["run_duration_p99_ms"]),
             ms(ref["run_duration_p50_ms"], ref["run_duration_p99_ms"]), "", "", ""),
            ("11 LangGraph", "CPU ms per run: the executor process; ref: the ainvoke process",
             num(a["cpu_ms_per_run"], 1), num(ref["cpu_ms_per_run"], 1),
             ratio(a["cpu_ms_per_run"], ref["cpu_ms_per_run"]), "", ""),
            ("11 LangGraph", "start latency ms p50 / p99; events and steps a run; PostgreSQL "
             "connections of the executor, max",
             f"{ms(a['start_latency_p50_ms'], a['start_latency_p99_ms'])}; "
             f"{a['events_per_run']:.0f}, {a['steps_per_run']:.0f}; "
             f"{a.get('connections_max', '—')}", "", "", "", ""),
        ]  # fmt: skip
    i = r.get("interop", {})
    if "starts" in i:
        st, lat, cfg = i["starts"], i["latency"], i["config"]
        rest, a2a, rpc = st["rest"], st["a2a"], st["jsonrpc"]
        sse, sub = lat["sse"], lat["a2a"]
        conns = cfg["connections"]
        out += [
            ("12 A2A and MCP", f"A2A message:send (return_immediately) req/s, {conns} "
             "connections, one daphne process; ref: REST POST /runs, same process",
             num(a2a["rps"]), num(rest["rps"]), ratio(a2a["rps"], rest["rps"]), "≥ 0.8x",
             met(a2a["rps"] >= 0.8 * rest["rps"])),
            ("12 A2A and MCP", "A2A JSON-RPC SendMessage req/s; ref: REST POST /runs",
             num(rpc["rps"]), num(rest["rps"]), ratio(rpc["rps"], rest["rps"]), "", ""),
            ("12 A2A and MCP", f"token → client ms p50 / p99, tasks/{{id}}:subscribe, "
             f"{lat['open_streams']:,} idle SSE streams open; ref: SSE",
             ms(sub["p50_ms"], sub["p99_ms"]), ms(sse["p50_ms"], sse["p99_ms"]),
             f"{sub['p99_ms'] - sse['p99_ms']:+.1f} ms", "p99 within 5 ms of SSE's",
             met(sub["p99_ms"] <= sse["p99_ms"] + 5)),
        ]  # fmt: skip
    w = r.get("waits", {})
    if "answers" in w:
        idle, wait, a = w["idle"], w["waiting"], w["answers"]
        cpu = a["cpu_ms_per_answer"]
        out += [
            ("13 waiting runs", f"executor RSS MB with {wait['runs']:,} runs waiting for input; "
             "ref: idle after a warm-up", num(wait["rss_mb"], 1), num(idle["rss_mb"], 1),
             ratio(wait["rss_mb"], idle["rss_mb"]), "≤ 1.1x",
             met(wait["rss_mb"] <= 1.1 * idle["rss_mb"])),
            ("13 waiting runs", "executor PostgreSQL connections, max; ref: idle",
             wait["pg_connections_max"], idle["pg_connections_max"], "", "≤ 1.1x",
             met(wait["pg_connections_max"] <= 1.1 * idle["pg_connections_max"])),
            ("13 waiting runs", f"answer → next agent.started ms p50 / p99, {a['accepted']:,} "
             f"answers at {w['config']['rate']:g}/s (achieved {a['rate_achieved']:g}/s) through "
             "one web process, 1 executor", ms(a["answer_to_agent_p50_ms"],
             a["answer_to_agent_p99_ms"]), "", "", "p99 ≤ 1,000",
             met(a["answer_to_agent_p99_ms"] <= 1000)),
            ("13 waiting runs", "answer POST ms p50 / p99; CPU ms per answer, web / executor",
             f"{ms(a['http_p50_ms'], a['http_p99_ms'])}; {cpu['web']:.1f} / "
             f"{cpu['executor']:.1f}", "", "", "", ""),
        ]  # fmt: skip
    for name, error in failed:
        out.append((name, "failed", error, "", "", "", met(False)))
    return out


def table(results: dict, meta: dict) -> str:
    head = ["scenario", "metric", "agentsvc", "reference", "ratio", "target", "met?"]
    lines = [
        f"Benchmark suite ({meta['mode']}), {meta['date']}, commit {meta['commit']}: "
        f"{meta['cores']} cores ({meta['cpu']}), {meta['ram_gib']} GiB RAM; "
        f"load average {meta['load_start']} at the start, {meta['load_end']} at the end; "
        f"{meta['seconds']:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows(results)]
    return "\n".join(lines) + "\n"


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 4 minutes")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run")
    args = parser.parse_args()
    exit_on_sigterm()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **machine(),
        "load_start": load(),
    }
    started = time.monotonic()
    results = {}
    for name in args.only.split(","):
        print(f"{name} ... (load {load()})", flush=True)
        results[name] = run_scenario(name, args.quick)
        state = results[name].get("error", "done")
        print(f"{name}: {state} in {results[name]['seconds']:.0f} s", flush=True)
    meta["load_end"] = load()
    meta["seconds"] = time.monotonic() - started
    text = table(results, meta)
    print("\n" + text)
    (RESULTS / "latest.md").write_text(text)
    (RESULTS / "latest.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
