"""The executor process: many runs at once on one event loop.

A run spends its life waiting on a model, so an execution is a coroutine, not a process or a
thread. The process claims queued runs from the database (fairly across keys, skipping rows a
peer is claiming), streams from the models over one pooled async HTTP client, and writes the
events of all its runs together: one transaction per flush (the group commit), one heartbeat
statement per tick for all of them. Database work runs on a small pool of threads, so the
process uses at most that many connections whatever the number of runs it holds.

`python manage.py executor` runs one; `run_execute` executes a single run in-process (tests,
scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from agentsvc import logs
from runs import keeper
from runs.execution import claims
from runs.execution.providers import async_client
from runs.execution.run import Execution, Stop
from runs.services import Append, events_write
from runs.wakeup import EXECUTORS_GROUP, executor_socket_path

logger = logging.getLogger(__name__)

HTTP_POOL_SIZE = 16  # model connections per httpx client

# Other apps run services of their own inside the executor process (webhook delivery):
# fn(executor) -> coroutine, started with the executor and cancelled when it stops.
Service = Callable[["Executor"], Awaitable[None]]
_services: list[Service] = []


def service_register(service: Service) -> None:
    if service not in _services:
        _services.append(service)


class Db:
    """Runs the executor's database work off the event loop.

    With `threads`, on a pool of that many threads: a pooled connection is handed back after
    each call (PostgreSQL), so the process holds at most `threads` connections for its runs.
    Without, in the thread that called `run_execute` (asgiref's thread-sensitive mode), so a
    test's transaction sees the run it made."""

    def __init__(self, threads: int | None) -> None:
        self.pool = ThreadPoolExecutor(threads, "executor-db") if threads else None

    async def __call__(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        if self.pool is None:
            return await sync_to_async(fn, thread_sensitive=True)(**kwargs)
        loop = asyncio.get_running_loop()
        # run_in_executor does not copy the context (to_thread does): the run's log fields and
        # span go along by hand.
        call = partial(contextvars.copy_context().run, _call_and_release, fn, kwargs)
        return await loop.run_in_executor(self.pool, call)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _call_and_release(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(**kwargs)
    finally:
        if getattr(connection, "pool", None) is not None or connection.errors_occurred:
            connection.close()  # back to the pool; a broken one is replaced next time


class EventWriter:
    """The group commit: events of all runs wait here and go in one transaction per flush.

    A flush starts as soon as events are waiting and the previous flush is done (at most one a
    FLUSH_MS tick), so a busy process commits a few times per tick however many runs it holds,
    and a quiet one adds at most one tick to an event's latency. A run whose row no longer
    matches its claim (cancelled by the keeper, retried elsewhere) is stopped without writing.
    A database error keeps the events, in order, for the next flush."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.pending: dict[UUID, tuple[Execution, Append]] = {}
        self.waiters: dict[UUID, asyncio.Future] = {}
        self.count = 0
        self.work = asyncio.Event()
        self.flushed = asyncio.Event()
        # Held by each flush and each heartbeat: one transaction on this process's runs at once.
        self.lock = asyncio.Lock()
        self.commits = 0
        self.events_written = 0

    def add(
        self,
        execution: Execution,
        event: str,
        data: dict,
        fields: dict,
        step: tuple | None = None,
    ) -> None:
        """Queue an event of the run (and the fields it sets, and the step it finishes)."""
        now = self.executor.now()
        entry = self.pending.get(execution.run_id)
        if entry is None or entry[0] is not execution:
            self.pending[execution.run_id] = (execution, execution.append([], {}))
            entry = self.pending[execution.run_id]
        entry[1].events.append((event, data, now))
        entry[1].fields.update(fields)
        if step is not None:
            entry[1].steps.append((*step, now))
        self.count += 1
        self.work.set()

    async def add_and_wait(
        self, execution: Execution, event: str, data: dict, fields: dict
    ) -> int | None:
        """Add the run's last event and wait for its commit; the seq, or None if not ours."""
        self.add(execution, event, data, fields)
        return await self._wait(execution.run_id)

    async def hand_back(self, execution: Execution) -> int | None:
        append = claims.hand_back(
            run_id=execution.run_id,
            worker=self.executor.id,
            attempt=execution.claim.attempt,
            chain=execution.claim.chain,
            version=execution.claim.version,
        )
        return await self.last_write(execution, append)

    async def last_write(self, execution: Execution, append: Append) -> int | None:
        """The execution's last write (a hand-back, a stop to wait for input): after what is
        pending of the run, in its transaction, under `append`'s condition; waits for its
        commit and returns the seq, or None if the condition did not hold."""
        entry = self.pending.get(execution.run_id)
        if entry is not None and entry[0] is execution:
            entry[1].events.extend(append.events)
            entry[1].fields.update(append.fields)
            entry[1].steps.extend(append.steps)
            entry[1].when = append.when
        else:
            self.pending[execution.run_id] = (execution, append)
        self.count += 1
        self.work.set()
        return await self._wait(execution.run_id)

    def committed(self, run_id: UUID) -> asyncio.Future:
        """Done when what the run has queued so far is committed (its seq; None if the run is
        no longer ours). Ask right after queueing: until the run queues something, it waits."""
        future = self.waiters.get(run_id)
        if future is None:
            future = self.waiters[run_id] = asyncio.get_running_loop().create_future()
        return future

    async def _wait(self, run_id: UUID) -> int | None:
        return await asyncio.shield(self.committed(run_id))

    async def backpressure(self) -> None:
        """Runs pause while too many events wait (the database is slower than the models)."""
        while self.count >= settings.EXECUTOR_MAX_PENDING_EVENTS:
            self.flushed.clear()
            await self.flushed.wait()

    async def run(self) -> None:
        tick = settings.EXECUTOR_FLUSH_MS / 1000
        failures = 0
        while True:
            await self.work.wait()
            self.work.clear()
            if not self.pending:
                continue
            started = time.monotonic()
            batch, self.pending = self.pending, {}
            waiters, self.waiters = self.waiters, {}
            count, self.count = self.count, 0
            # Where each run's log stands before this flush, and how many events it adds.
            expected = {run_id: (e.seq, len(a.events)) for run_id, (e, a) in batch.items()}
            try:
                async with self.lock:
                    written = await self.executor.db(
                        events_write, appends=[append for _, append in batch.values()]
                    )
            except (OperationalError, InterfaceError) as e:
                failures += 1
                logger.warning("events not written (%s); retrying", e)
                written = await self._committed_anyway(expected)
                if written is None:
                    self._put_back(batch, waiters, count)
                    await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                    continue
            except Exception:
                # Not the database being away: retrying would fail the same way. The batch's
                # runs stop here, unwritten; their heartbeat stops too, so the keeper retries
                # them (or fails them worker_lost).
                logger.exception("events not written; %s runs left to the keeper", len(batch))
                written = dict.fromkeys(batch)
            failures = 0
            self.commits += 1
            self.events_written += count
            for run_id, (execution, _) in batch.items():
                seq = written[run_id]
                if seq is None:
                    self.executor.lost(execution)
                else:
                    execution.seq = seq
                future = waiters.pop(run_id, None)
                if future is not None and not future.done():
                    future.set_result(seq)
            self.waiters.update(waiters)  # waiting on events added after this batch
            self.flushed.set()
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))

    async def _committed_anyway(
        self, expected: dict[UUID, tuple[int, int]]
    ) -> dict[UUID, int | None] | None:
        """A connection lost during the commit leaves its outcome unknown: writing the events
        again would log them twice. Once the database answers, the runs' last seq tell: the
        batch committed (each run's seq, or None for a run no longer where this flush left it),
        or not (None: write it again). Only this executor appends to the runs it holds."""
        delay = 0.1
        while True:
            try:
                current = await self.executor.db(claims.runs_last_seq, run_ids=list(expected))
                break
            except (OperationalError, InterfaceError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if not any(current.get(run) == seq + n for run, (seq, n) in expected.items()):
            return None
        logger.warning("a flush whose commit seemed lost had committed; not written again")
        return {
            run: current[run] if current.get(run) == seq + n else None
            for run, (seq, n) in expected.items()
        }

    def _put_back(self, batch: dict, waiters: dict, count: int) -> None:
        """Failed events go first again, before anything added since."""
        for run_id, (execution, append) in self.pending.items():
            if run_id in batch and batch[run_id][0] is execution:
                batch[run_id][1].events.extend(append.events)
                batch[run_id][1].fields.update(append.fields)
                batch[run_id][1].steps.extend(append.steps)
            else:
                batch[run_id] = (execution, append)
        self.pending = batch
        self.waiters = {**waiters, **self.waiters}
        self.count += count
        self.work.set()


class Executor:
    def __init__(self, *, capacity: int, db: Db) -> None:
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.capacity = capacity
        self.db = db
        self.runs: dict[UUID, Execution] = {}
        self.writer = EventWriter(self)
        # Many small pools of model connections: httpcore looks through all of a pool's
        # connections on every request (quadratically), which with hundreds of kept-alive
        # connections in one pool took most of the loop's time. A run takes the least busy pool,
        # so none holds more than HTTP_POOL_SIZE runs.
        shards = -(-capacity // HTTP_POOL_SIZE)
        self.clients = [async_client(HTTP_POOL_SIZE) for _ in range(shards)]
        self.client_runs = [0] * shards
        self.wake = asyncio.Event()
        self.cancel_wake = asyncio.Event()
        self.draining = False
        self.started_runs = 0
        # What a kind of chain keeps for the process (LangGraph's checkpointer), by name, made
        # on first use; each is closed (`aclose()`) with the model clients.
        self.resources: dict[str, Any] = {}

    @staticmethod
    def now() -> datetime:
        return timezone.now()

    async def close_clients(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))
        for resource in self.resources.values():
            await resource.aclose()

    # --- Runs -----------------------------------------------------------------------------

    def start(self, claim: claims.Claimed) -> Execution:
        old = self.runs.get(claim.run_id)
        if old is not None:  # a stale execution of an earlier attempt: its writes fail anyway
            self._stop(old, Stop("lost"))
        execution = Execution(self, claim)
        self.runs[claim.run_id] = execution
        execution.task = asyncio.create_task(self._execute(execution), name=str(claim.run_id))
        self.started_runs += 1
        return execution

    async def _execute(self, execution: Execution) -> None:
        # In the run's own task (which copied the context at its creation): its lines only.
        logs.bind(run_id=str(execution.run_id), key_prefix=execution.claim.key_prefix or None)
        shard = min(range(len(self.clients)), key=self.client_runs.__getitem__)
        self.client_runs[shard] += 1
        execution.http = self.clients[shard]
        try:
            await execution.execute()
        finally:
            self.client_runs[shard] -= 1
            if self.runs.get(execution.run_id) is execution:
                del self.runs[execution.run_id]
            self.wake.set()  # a slot is free

    def _stop(self, execution: Execution, stop: Stop) -> None:
        if execution.stop is None and execution.task is not None:
            execution.stop = stop
            execution.task.cancel()

    def lost(self, execution: Execution) -> None:
        self._stop(execution, Stop("lost"))

    # --- Loops ----------------------------------------------------------------------------

    async def claim_loop(self) -> None:
        """Claim whenever woken (a run was queued, a slot freed up) or every EXECUTOR_POLL_S."""
        interval = settings.EXECUTOR_CLAIM_INTERVAL_MS / 1000
        while not self.draining:
            free = self.capacity - len(self.runs)
            again = False
            if free > 0:
                batch = min(free, settings.EXECUTOR_CLAIM_BATCH)
                try:
                    claimed, again = await self.db(claims.runs_claim, worker=self.id, limit=batch)
                except (OperationalError, InterfaceError) as e:
                    logger.warning("claim failed (%s)", e)
                    claimed = []
                for claim in claimed:
                    self.start(claim)
                again = again or len(claimed) == batch
            if not again:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), settings.EXECUTOR_POLL_S)
            self.wake.clear()
            await asyncio.sleep(interval)

    async def heartbeat(self, *, process: bool = True) -> None:
        # Under the writer's lock: the beat and a flush update the same rows, and two
        # transactions locking them in different orders would deadlock.
        async with self.writer.lock:
            await self.db(
                claims.executor_heartbeat,
                worker=self.id,
                run_ids=list(self.runs),
                host=socket.gethostname(),
                pid=os.getpid(),
                capacity=self.capacity,
                in_flight=len(self.runs),
                draining=self.draining,
                process=process,
            )

    async def heartbeat_loop(self, *, process: bool = True) -> None:
        """One beat per tick for the process and all its runs; then (`process`) the lost-peer
        check, so runs of a dead executor go back to the queue within WORKER_LOST_AFTER_S and a
        tick, without waiting for the keeper's minute."""
        while True:
            await asyncio.sleep(settings.HEARTBEAT_S)
            try:
                await self.heartbeat(process=process)
                if process:
                    await self.db(keeper.runs_recover_lost)
            except (OperationalError, InterfaceError) as e:
                logger.warning("heartbeat failed (%s)", e)

    async def cancel_loop(self) -> None:
        """Cancellation reaches a run at once when the cancel's wake-up arrives, otherwise
        within EXECUTOR_CANCEL_POLL_MS; also while its model says nothing."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.cancel_wake.wait(), settings.EXECUTOR_CANCEL_POLL_MS / 1000
                )
            self.cancel_wake.clear()
            if not self.runs:
                continue
            try:
                asked = await self.db(claims.runs_cancel_requested, worker=self.id)
            except (OperationalError, InterfaceError) as e:
                logger.warning("cancel check failed (%s)", e)
                continue
            for run_id, attempt, reason in asked:
                execution = self.runs.get(run_id)
                if execution is not None and execution.claim.attempt == attempt:
                    self._stop(execution, Stop("cancel", reason))

    async def wake_listener(self) -> None:
        """Wake-ups for queued runs and cancellations: the channel layer (Redis), or a datagram
        socket in the embedded default. Either may drop one; the polls are the fallback."""
        path = executor_socket_path()
        if path:
            await self._datagram_listener(path)
            return
        if not settings.STREAM_WAKEUP_VIA_LAYER:
            return  # PostgreSQL without Redis: the poll alone
        layer = get_channel_layer()
        channel = await layer.new_channel()
        joined: float | None = None
        while True:
            try:
                if joined is None or time.monotonic() - joined > 3600:  # membership expires
                    await layer.group_add(EXECUTORS_GROUP, channel)
                    joined = time.monotonic()
                message = await layer.receive(channel)
                self._woken(message.get("type"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("wake-ups unavailable (%s); polling", e)
                joined = None
                await asyncio.sleep(settings.EXECUTOR_POLL_S)

    def _woken(self, kind: str | None) -> None:
        (self.cancel_wake if kind == "executor.cancel" else self.wake).set()

    async def _datagram_listener(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(sock, 64)
                self._woken("executor.cancel" if data == b"cancel" else "executor.wake")
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # --- The process ----------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain: no new claims, WORKER_DRAIN_S for the runs in
        flight to finish, and the rest handed back to the queue."""
        await self.heartbeat()
        loops = [
            asyncio.create_task(self.writer.run(), name="writer"),
            asyncio.create_task(self.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.cancel_loop(), name="cancel"),
            asyncio.create_task(self.wake_listener(), name="wake"),
        ]
        services = [asyncio.create_task(service(self)) for service in _services]
        claimer = asyncio.create_task(self.claim_loop(), name="claim")
        logger.info("executor %s: up to %s runs at once", self.id, self.capacity)
        try:
            await stop.wait()
        finally:
            self.draining = True
            claimer.cancel()
            for task in services:
                task.cancel()
            await self.drain()
            for task in loops:
                task.cancel()
            await asyncio.gather(claimer, *services, *loops, return_exceptions=True)
            with contextlib.suppress(OperationalError, InterfaceError):
                await self.db(claims.executor_remove, worker=self.id)
            await self.close_clients()
            logger.info("executor %s: stopped", self.id)

    async def drain(self) -> None:
        deadline = time.monotonic() + settings.WORKER_DRAIN_S
        while self.runs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.runs.values())
        for execution in left:
            self._stop(execution, Stop("hand_back"))
        tasks = [e.task for e in left if e.task is not None]
        if tasks:
            logger.info("executor %s: handing %s runs back to the queue", self.id, len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)


def executor_main(*, capacity: int, threads: int) -> None:
    """The `executor` command: serve until SIGTERM or SIGINT, then drain."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        db = Db(threads)
        try:
            await Executor(capacity=capacity, db=db).serve(stop)
        finally:
            db.close()

    asyncio.run(main())


def run_execute(*, run_id: str | UUID) -> None:
    """Claim one queued run and execute it here, to its end (tests and scripts)."""
    async_to_sync(_execute_one)(UUID(str(run_id)))


async def _execute_one(run_id: UUID) -> None:
    executor = Executor(capacity=1, db=Db(None))
    claimed, _ = await executor.db(claims.runs_claim, worker=executor.id, limit=1, run_id=run_id)
    if not claimed:
        await executor.close_clients()
        return  # cancelled while queued, or another executor has it
    loops = [
        asyncio.create_task(executor.writer.run()),
        asyncio.create_task(executor.heartbeat_loop(process=False)),
        asyncio.create_task(executor.cancel_loop()),
    ]
    try:
        execution = executor.start(claimed[0])
        await asyncio.gather(execution.task, return_exceptions=True)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await executor.close_clients()
