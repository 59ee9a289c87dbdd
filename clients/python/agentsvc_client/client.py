"""The synchronous client: `Client(base_url, api_key)` with runs, chains and webhook resources."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from agentsvc_client import _core
from agentsvc_client._core import (
    AUTO,
    INPUT_REQUIRED,
    KEEP,
    SSE_HEADERS,
    TERMINAL_STATUSES,
    Event,
    SSEParser,
)
from agentsvc_client.errors import APIConnectionError, WaitTimeout, error_from_response
from agentsvc_client.errors import retry_after_of as _retry_after


class Client:
    """A caller of one agentsvc service. Arguments fall back to AGENTSVC_URL / AGENTSVC_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = _core.settings_from(
            base_url,
            api_key,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
        )
        self._http = httpx.Client(
            base_url=self.settings.base_url,
            headers=_core.client_headers(self.settings),
            timeout=timeout,
            transport=transport,
        )
        self.runs = Runs(self)
        self.chains = Chains(self)
        self.webhook_endpoints = WebhookEndpoints(self)
        self.deliveries = Deliveries(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict | None = None,
        idempotency_key: Any = AUTO,
        headers: dict | None = None,
    ) -> httpx.Response:
        """One logical call: retried on 429/503/409-in-progress and connection errors with the
        same Idempotency-Key; a non-2xx final answer raises its typed APIError."""
        headers = _core.request_headers(method, idempotency_key, headers)
        safe = method != "POST" or "Idempotency-Key" in headers
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= self.settings.max_attempts
            try:
                response = self._http.request(
                    method, path, json=json, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                if last or not safe:
                    raise APIConnectionError(f"{method} {path}: {exc!r}") from exc
                time.sleep(_core.backoff(self.settings, attempt, None))
                continue
            if response.is_success:
                return response
            if not last and _core.is_retryable(response) and (safe or response.status_code != 409):
                time.sleep(_core.response_delay(self.settings, attempt, response))
                continue
            raise error_from_response(response)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return _core.decode(self.request(method, path, **kw))

    def pages(self, path: str, params: dict | None = None) -> Iterator[dict]:
        """Every item of a cursor-paginated list, following `next`."""
        url: str | None = path
        while url:
            page = self.call("GET", url, params=params)
            yield from page["results"]
            url, params = page.get("next"), None

    def open_stream(self, method: str, path: str, **kw: Any):
        return self._http.stream(method, path, **kw)


class Runs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        chain: str,
        input: dict,
        *,
        version: int | None = None,
        metadata: dict | None = None,
        webhook: dict | None = None,
        idempotency_key: Any = AUTO,
    ) -> dict:
        """Start a run (202): the handle {run_id, status, poll_url, events_url, ...}."""
        body = _core.create_body(input, version, metadata, webhook)
        return self._c.call(
            "POST", f"/api/v1/chains/{chain}/runs", json=body, idempotency_key=idempotency_key
        )

    def invoke(
        self,
        chain: str,
        input: dict,
        *,
        version: int | None = None,
        metadata: dict | None = None,
        webhook: dict | None = None,
        wait_s: float | None = None,
        idempotency_key: Any = AUTO,
    ) -> dict:
        """Run and wait server-side: the finished run, or the handle if it is still going.
        A failed run raises ChainFailedError, a timed-out one ChainTimedOutError."""
        body = _core.create_body(input, version, metadata, webhook, wait_s=wait_s)
        return self._c.call(
            "POST", f"/api/v1/chains/{chain}/invoke", json=body, idempotency_key=idempotency_key
        )

    def get(self, run_id: str) -> dict:
        return self._c.call("GET", f"/api/v1/runs/{run_id}")

    def list(
        self,
        *,
        status: str | None = None,
        chain: str | None = None,
        created_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[dict]:
        """Every run of the key's owner, newest first, page after page (`limit` is the page
        size, at most 100; stop iterating to stop fetching)."""
        params = {"status": status, "chain": chain, "created_after": created_after, "limit": limit}
        return self._c.pages("/api/v1/runs", {k: v for k, v in params.items() if v is not None})

    def cancel(self, run_id: str, *, idempotency_key: Any = AUTO) -> dict:
        return self._c.call(
            "POST", f"/api/v1/runs/{run_id}/cancel", idempotency_key=idempotency_key
        )

    def respond(
        self,
        run_id: str,
        request_id: str,
        *,
        approve: bool | None = None,
        input: dict | None = None,
        idempotency_key: Any = AUTO,
    ) -> dict:
        """Answer what a waiting run asks (its `input_request`): `approve=True/False` for an
        approval, `input={...}` for an input. The run (202, queued again). A request answered
        before raises ConflictError `input_already_received`."""
        body = _core.respond_body(request_id, approve, input)
        return self._c.call(
            "POST", f"/api/v1/runs/{run_id}/input", json=body, idempotency_key=idempotency_key
        )

    def rerun(
        self,
        run_id: str,
        *,
        input: dict | None = None,
        metadata: dict | None = None,
        webhook: Any = KEEP,
        idempotency_key: Any = AUTO,
    ) -> dict:
        """Start the run again (202, the new run's handle): same chain version, input, metadata
        and webhook, each replaced when given (`webhook=None` drops it). The new run's
        `rerun_of` names this one."""
        body = _core.rerun_body(input, metadata, webhook)
        return self._c.call(
            "POST", f"/api/v1/runs/{run_id}/rerun", json=body, idempotency_key=idempotency_key
        )

    def create_batch(
        self,
        chain: str,
        items: list[dict],
        *,
        version: int | None = None,
        idempotency_key: Any = AUTO,
    ) -> list[dict]:
        """Start up to 100 runs at once, all or none (a bad item raises ValidationError naming
        it, `items[3].input.topic`): their handles, in the items' order. Items are
        `{"input": ..., "metadata"?, "webhook"?}` or bare inputs."""
        body = _core.batch_body(items, version)
        answer = self._c.call(
            "POST",
            f"/api/v1/chains/{chain}/runs/batch",
            json=body,
            idempotency_key=idempotency_key,
        )
        return answer["results"]

    def stream_ticket(self, run_id: str | None = None, *, idempotency_key: Any = AUTO) -> dict:
        """`{ticket, expires_at}` for a browser: `?ticket=` opens this run's SSE stream and
        WebSocket (or, without run_id, the status feed) until it expires. Never put the key
        itself in a URL."""
        body = {"run_id": run_id} if run_id is not None else {}
        return self._c.call(
            "POST", "/api/v1/stream-tickets", json=body, idempotency_key=idempotency_key
        )

    def resend_webhooks(self, run_id: str, *, idempotency_key: Any = AUTO) -> dict:
        return self._c.call(
            "POST", f"/api/v1/runs/{run_id}/webhooks/resend", idempotency_key=idempotency_key
        )

    def events(
        self, run_id: str, *, after: int = 0, events: list[str] | None = None
    ) -> Iterator[Event]:
        """The stored events so far, as JSON pages (no streaming); `events` keeps only those
        types (each keeps its seq)."""
        while True:
            path = f"/api/v1/runs/{run_id}/events"
            params = {"after": after, **_core.events_param(events)}
            page = self._c.call("GET", path, params=params)
            for row in page["results"]:
                yield Event(seq=row["seq"], type=row["event"], data=row["data"])
            if not page["results"] or page.get("next_after") in (None, after):
                return
            after = page["next_after"]

    def wait(
        self,
        run_id: str,
        timeout: float = 300,
        *,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the run ends or waits for a person (status `input_required`: answer it
        with `respond`), sleeping as Retry-After says; WaitTimeout past `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            response = self._c.request("GET", f"/api/v1/runs/{run_id}")
            run = response.json()
            if on_progress:
                on_progress(run)
            if run["status"] in TERMINAL_STATUSES or run["status"] == INPUT_REQUIRED:
                return run
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(run)
            time.sleep(min(_retry_after(response) or 1.0, remaining))

    def stream(
        self,
        run_id: str | None = None,
        *,
        chain: str | None = None,
        input: dict | None = None,
        version: int | None = None,
        metadata: dict | None = None,
        webhook: dict | None = None,
        after: int = 0,
        events: list[str] | None = None,
        idempotency_key: Any = AUTO,
    ) -> Iterator[Event]:
        """A run's events, each once and in order, until its terminal event. Either follow a run
        (`run_id`) or start one (`chain`, `input`). A dropped connection is resumed with
        Last-Event-ID; a dropped start is retried with the same Idempotency-Key. `events` keeps
        only those types; the stream still ends when the run does, terminal event shown or not."""
        if (run_id is None) == (chain is None):
            raise ValueError("pass either run_id or chain (with input)")
        start_headers = _core.request_headers("POST", idempotency_key, SSE_HEADERS)
        body = _core.create_body(input or {}, version, metadata, webhook)
        last, failures = after, 0
        settings = self._c.settings
        while True:
            if run_id is None:
                ctx = self._c.open_stream(
                    "POST",
                    f"/api/v1/chains/{chain}/stream",
                    json=body,
                    headers=start_headers,
                    params=_core.events_param(events),
                )
            else:
                headers = {**SSE_HEADERS, **({"Last-Event-ID": str(last)} if last else {})}
                ctx = self._c.open_stream(
                    "GET",
                    f"/api/v1/runs/{run_id}/events",
                    headers=headers,
                    params=_core.events_param(events),
                )
            delay = None
            try:
                with ctx as response:
                    if response.status_code == 204:  # ended, nothing left after `last`
                        return
                    if response.status_code != 200:
                        raw = response.read()
                        if not _core.is_retryable(response, raw) or failures + 1 >= (
                            settings.max_attempts
                        ):
                            raise error_from_response(response, raw)
                        delay = _core.response_delay(settings, failures + 1, response)
                    else:
                        run_id = run_id or response.headers.get("X-Run-Id")
                        parser = SSEParser()
                        for line in response.iter_lines():
                            event = parser.feed(line)
                            if event is None or event.seq <= last:
                                continue
                            last, failures = event.seq, 0
                            run_id = run_id or event.run_id
                            yield event
                            if event.is_terminal:
                                return
                        # The server ended a filtered stream: the run is over if its
                        # terminal event was filtered out.
                        if events is not None and run_id is not None:
                            run = self._c.call("GET", f"/api/v1/runs/{run_id}")
                            if run["status"] in TERMINAL_STATUSES:
                                return
            except httpx.TransportError as exc:
                if failures + 1 >= settings.max_attempts:
                    raise APIConnectionError(f"stream of run {run_id}: {exc!r}") from exc
            failures += 1
            if failures >= settings.max_attempts:
                raise APIConnectionError(f"stream of run {run_id} ended early {failures} times")
            if delay is None:
                delay = _core.backoff(settings, failures, None)
            time.sleep(delay)


class Chains:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> Iterator[dict]:
        return self._c.pages("/api/v1/chains")

    def get(self, name: str, *, version: int | None = None) -> dict:
        params = {"version": version} if version is not None else None
        return self._c.call("GET", f"/api/v1/chains/{name}", params=params)


class WebhookEndpoints:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        url: str,
        *,
        events: list[str] | None = None,
        description: str | None = None,
        idempotency_key: Any = AUTO,
    ) -> dict:
        """Register an endpoint; the answer holds its `secret`, shown this once."""
        body = {k: v for k, v in (("url", url), ("events", events), ("description", description))}
        body = {k: v for k, v in body.items() if v is not None}
        return self._c.call(
            "POST", "/api/v1/webhook-endpoints", json=body, idempotency_key=idempotency_key
        )

    def list(self) -> Iterator[dict]:
        return self._c.pages("/api/v1/webhook-endpoints")

    def get(self, endpoint_id: str) -> dict:
        return self._c.call("GET", f"/api/v1/webhook-endpoints/{endpoint_id}")

    def update(self, endpoint_id: str, **fields: Any) -> dict:
        """PATCH any of url, events, description, enabled."""
        return self._c.call("PATCH", f"/api/v1/webhook-endpoints/{endpoint_id}", json=fields)

    def delete(self, endpoint_id: str) -> None:
        self._c.call("DELETE", f"/api/v1/webhook-endpoints/{endpoint_id}")

    def rotate_secret(self, endpoint_id: str, *, idempotency_key: Any = AUTO) -> dict:
        return self._c.call(
            "POST",
            f"/api/v1/webhook-endpoints/{endpoint_id}/rotate-secret",
            idempotency_key=idempotency_key,
        )

    def test(self, endpoint_id: str, *, idempotency_key: Any = AUTO) -> dict:
        """Send a signed `webhook.test` event to the endpoint now: `{delivery_id, webhook_id}`."""
        return self._c.call(
            "POST",
            f"/api/v1/webhook-endpoints/{endpoint_id}/test",
            idempotency_key=idempotency_key,
        )

    def recover(
        self,
        endpoint_id: str,
        since: str,
        *,
        until: str | None = None,
        idempotency_key: Any = AUTO,
    ) -> dict:
        """Resend every failed delivery of the endpoint created since `since` (RFC 3339, with
        a zone), up to `until`: `{count, delivery_ids}`."""
        body = {"since": since, **({"until": until} if until is not None else {})}
        return self._c.call(
            "POST",
            f"/api/v1/webhook-endpoints/{endpoint_id}/recover",
            json=body,
            idempotency_key=idempotency_key,
        )


class Deliveries:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, run_id: str) -> Iterator[dict]:
        return self._c.pages(f"/api/v1/runs/{run_id}/deliveries")

    def resend(self, delivery_id: str, *, idempotency_key: Any = AUTO) -> dict:
        return self._c.call(
            "POST", f"/api/v1/deliveries/{delivery_id}/resend", idempotency_key=idempotency_key
        )
