"""`agentsvc`: start, stream, wait for and inspect runs from a shell.

Exit codes: 0 the run completed (or the command succeeded); 1 the run ended failed, cancelled or
timed out; 2 bad usage or configuration; 3 the API answered an error; 4 the service could not be
reached; 5 --wait gave up before the run ended (the run goes on); 6 the run waits for a person's
answer (`agentsvc respond RUN ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agentsvc_client._core import INPUT_REQUIRED, Event
from agentsvc_client.client import Client
from agentsvc_client.errors import AgentsvcError, APIConnectionError, APIError, WaitTimeout

(
    EXIT_OK,
    EXIT_RUN_NOT_COMPLETED,
    EXIT_USAGE,
    EXIT_API,
    EXIT_CONNECTION,
    EXIT_WAIT,
    EXIT_INPUT_REQUIRED,
) = range(7)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentsvc",
        description="Start, stream, wait for and inspect agentsvc runs.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="service base URL (default: $AGENTSVC_URL)")
    p.add_argument("--api-key", help="API key (default: $AGENTSVC_API_KEY)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a run of CHAIN")
    run.add_argument("chain")
    run.add_argument("--input", required=True, help="the run input, a JSON object")
    run.add_argument("--version", type=int)
    run.add_argument("--metadata", help="a JSON object stored with the run")
    run.add_argument("--stream", action="store_true", help="print tokens live until the end")
    run.add_argument(
        "--events",
        help="with --stream: only these comma-separated event types (e.g. agent.output)",
    )
    run.add_argument(
        "--wait", action="store_true", help="show progress until the end (or a request for input)"
    )
    run.add_argument("--timeout", type=float, default=600, help="--wait gives up after (s)")
    run.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    runs = sub.add_parser("runs", help="list, get or cancel runs")
    runs_sub = runs.add_subparsers(dest="action", required=True)
    ls = runs_sub.add_parser("list")
    ls.add_argument("--status")
    ls.add_argument("--chain")
    ls.add_argument("--limit", type=int, default=20, help="how many runs to show")
    for name in ("get", "cancel"):
        one = runs_sub.add_parser(name)
        one.add_argument("run_id")
    rerun = runs_sub.add_parser("rerun", help="start a run again (same version, input, metadata)")
    rerun.add_argument("run_id")
    rerun.add_argument("--input", help="a JSON object instead of the original input")
    rerun.add_argument("--metadata", help="a JSON object instead of the original metadata")
    for action in runs_sub.choices.values():
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    respond = sub.add_parser("respond", help="answer what a waiting run asks")
    respond.add_argument("run_id")
    answer = respond.add_mutually_exclusive_group(required=True)
    answer.add_argument("--approve", action="store_true", help="approve the request")
    answer.add_argument("--refuse", action="store_true", help="refuse the request")
    answer.add_argument("--input", help="the answer to an input request, a JSON object")
    respond.add_argument("--request", help="the request id (default: the run's pending one)")
    respond.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    batch = sub.add_parser("batch", help="start many runs of CHAIN at once, all or none")
    batch.add_argument("chain")
    batch.add_argument(
        "--items",
        required=True,
        help='a file (or - for stdin): a JSON array, or JSON lines, of {"input": ...} or inputs',
    )
    batch.add_argument("--version", type=int)
    batch.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    endpoints = sub.add_parser("endpoints", help="test webhook endpoints, recover deliveries")
    endpoints_sub = endpoints.add_subparsers(dest="action", required=True)
    test = endpoints_sub.add_parser("test", help="send a signed webhook.test event now")
    test.add_argument("endpoint_id")
    recover = endpoints_sub.add_parser("recover", help="resend failed deliveries since a time")
    recover.add_argument("endpoint_id")
    recover.add_argument("--since", required=True, help="RFC 3339 with a zone")
    recover.add_argument("--until", help="RFC 3339 with a zone (default: now)")
    for action in endpoints_sub.choices.values():
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    chains = sub.add_parser("chains", help="list the chains")
    chains.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    return p


def _json_arg(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SystemExit(_usage(f"{flag} is not valid JSON: {exc}"))  # noqa: B904
    if not isinstance(value, dict):
        raise SystemExit(_usage(f"{flag} must be a JSON object"))
    return value


def _usage(message: str) -> int:
    print(f"agentsvc: {message}", file=sys.stderr)
    return EXIT_USAGE


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _summary(run: dict) -> str:
    usage = run.get("usage") or {}
    duration = run.get("duration_ms")
    lines = [
        f"run       {run['run_id']}",
        f"status    {run['status']}",
        f"cost      ${run.get('cost') or '0'}",
        f"duration  {duration / 1000:.2f} s" if duration is not None else "duration  -",
        "tokens    {} in, {} out, {} total".format(
            usage.get("input_tokens", 0),
            usage.get("output_tokens", 0),
            usage.get("total_tokens", 0),
        ),
    ]
    if run.get("error"):
        lines.append(f"error     {run['error'].get('code')}: {run['error'].get('message')}")
    request = run.get("input_request")
    if request:
        lines += _request_lines(request)
    return "\n".join(lines)


def _request_lines(request: dict) -> list[str]:
    what = request.get("kind")
    if request.get("tool"):
        what = f"{what} of {request['tool']}({json.dumps(request.get('arguments'))})"
    lines = [f"asks      {what}: {request.get('prompt')}"]
    if request.get("schema"):
        lines.append(f"schema    {json.dumps(request['schema'])}")
    lines.append(f"request   {request.get('request_id')} (expires {request.get('expires_at')})")
    return lines


def _progress(run: dict) -> None:
    p = run.get("progress") or {}
    agent = f" ({p['current_agent']})" if p.get("current_agent") else ""
    done, total = p.get("agents_completed", 0), p.get("agents_total") or "?"
    print(f"\r{run['status']:<10} agents {done}/{total}{agent}   ", end="", file=sys.stderr)
    sys.stderr.flush()


def _finish(client: Client, run: dict, as_json: bool) -> int:
    if as_json:
        _print_json(run)
    else:
        print(_summary(run))
    return _exit_of(run)


def _run(client: Client, args: argparse.Namespace) -> int:
    run_input = _json_arg(args.input, "--input")
    metadata = _json_arg(args.metadata, "--metadata")
    if args.stream:
        run_id, agent = None, None
        events = args.events.split(",") if args.events else None
        for event in client.runs.stream(
            chain=args.chain,
            input=run_input,
            version=args.version,
            metadata=metadata,
            events=events,
        ):
            run_id = event.run_id
            if args.json:
                print(json.dumps({"seq": event.seq, "event": event.type, "data": event.data}))
            else:
                agent = _print_event(event, agent)
            sys.stdout.flush()
            if event.is_input_required:
                break  # a person answers (agentsvc respond); the run waits, nothing is lost
        if not args.json:
            print()
        final = client.runs.get(run_id)
        return _finish(client, final, False) if not args.json else _exit_of(final)
    handle = client.runs.create(args.chain, run_input, version=args.version, metadata=metadata)
    if not args.wait:
        if args.json:
            _print_json(handle)
        else:
            print(handle["run_id"])
        return EXIT_OK
    try:
        final = client.runs.wait(
            handle["run_id"], args.timeout, on_progress=None if args.json else _progress
        )
    finally:
        if not args.json:
            print(file=sys.stderr)
    return _finish(client, final, args.json)


def _print_event(event: Event, agent: str | None) -> str | None:
    """Tokens as they come, with a header line whenever the next agent starts."""
    if event.type == "agent.started":
        if agent is not None:
            print()
        print(f"[{event.data['agent']}]", file=sys.stderr)
        return event.data["agent"]
    if event.type == "agent.output":
        print(event.chunk, end="")
    return agent


def _exit_of(run: dict) -> int:
    if run["status"] == INPUT_REQUIRED:
        return EXIT_INPUT_REQUIRED
    return EXIT_OK if run["status"] == "completed" else EXIT_RUN_NOT_COMPLETED


def _respond(client: Client, args: argparse.Namespace) -> int:
    answer = _json_arg(args.input, "--input")
    request_id = args.request
    if request_id is None:
        request = client.runs.get(args.run_id).get("input_request")
        if not request:
            return _usage(f"run {args.run_id} is not waiting for input")
        request_id = request["request_id"]
    approve = None if answer is not None else bool(args.approve)
    run = client.runs.respond(args.run_id, request_id, approve=approve, input=answer)
    if args.json:
        _print_json(run)
    else:
        print(f"answered {request_id}; run {run['run_id']} is {run['status']}")
    return EXIT_OK


def _runs(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        runs = []
        for run in client.runs.list(status=args.status, chain=args.chain, limit=100):
            runs.append(run)
            if len(runs) >= args.limit:
                break
        if args.json:
            _print_json(runs)
            return EXIT_OK
        print(f"{'RUN':<36}  {'CHAIN':<20}  {'STATUS':<10}  CREATED")
        for run in runs:
            print(
                f"{run['run_id']:<36}  {run['chain']:<20}  {run['status']:<10}  {run['created_at']}"
            )
        return EXIT_OK
    if args.action == "rerun":
        handle = client.runs.rerun(
            args.run_id,
            input=_json_arg(args.input, "--input"),
            metadata=_json_arg(args.metadata, "--metadata"),
        )
        if args.json:
            _print_json(handle)
        else:
            print(handle["run_id"])
        return EXIT_OK
    run = client.runs.get(args.run_id) if args.action == "get" else client.runs.cancel(args.run_id)
    if args.json:
        _print_json(run)
    else:
        print(_summary(run))
    return EXIT_OK


def _read_items(source: str) -> list:
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise SystemExit(_usage(f"--items: {exc}"))  # noqa: B904
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise SystemExit(_usage(f"--items is not valid JSON: {exc}"))  # noqa: B904
    if not all(isinstance(item, dict) for item in items):
        raise SystemExit(_usage("--items must hold JSON objects"))
    return items


def _batch(client: Client, args: argparse.Namespace) -> int:
    handles = client.runs.create_batch(args.chain, _read_items(args.items), version=args.version)
    if args.json:
        _print_json(handles)
    else:
        for handle in handles:
            print(handle["run_id"])
    return EXIT_OK


def _endpoints(client: Client, args: argparse.Namespace) -> int:
    if args.action == "test":
        answer = client.webhook_endpoints.test(args.endpoint_id)
        text = f"sent webhook.test: delivery {answer['delivery_id']}"
    else:
        answer = client.webhook_endpoints.recover(args.endpoint_id, args.since, until=args.until)
        text = f"{answer['count']} failed delivery(ies) sent again"
    if args.json:
        _print_json(answer)
    else:
        print(text)
    return EXIT_OK


def _chains(client: Client, args: argparse.Namespace) -> int:
    chains = list(client.chains.list())
    if args.json:
        _print_json(chains)
        return EXIT_OK
    print(f"{'CHAIN':<20}  {'VERSION':>7}  {'AGENTS':>6}  AVAILABLE  DESCRIPTION")
    for c in chains:
        available = "yes" if c.get("available", True) else "no"
        print(
            f"{c['name']:<20}  {c['version']:>7}  {len(c['agents']):>6}  {available:<9}  "
            f"{c.get('description') or ''}"
        )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client = Client(args.url, args.api_key, max_attempts=4)
    except AgentsvcError as exc:
        return _usage(str(exc))
    commands = {
        "run": _run,
        "runs": _runs,
        "respond": _respond,
        "batch": _batch,
        "endpoints": _endpoints,
        "chains": _chains,
    }
    try:
        with client:
            return commands[args.command](client, args)
    except APIError as exc:
        print(f"agentsvc: {exc}", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error.get('field')}: {error.get('message')}", file=sys.stderr)
        return EXIT_API
    except APIConnectionError as exc:
        print(f"agentsvc: cannot reach the service: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    except WaitTimeout as exc:
        print(f"agentsvc: {exc} (gave up waiting; the run goes on)", file=sys.stderr)
        return EXIT_WAIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
