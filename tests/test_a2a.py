"""A2A with the official client (`a2a-sdk`), as a user runs it, against a real daphne process and
the suite's executor: cards, send (at once and blocking), stream, get, list, cancel, subscribe and
its resume after a dropped connection, push notifications, auth, tenancy and limits."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from a2a.client import ClientCallContext, ClientConfig, create_client
from a2a.client.errors import A2AClientError
from a2a.helpers.proto_helpers import new_data_part, new_text_part
from a2a.types.a2a_pb2 import (
    AuthenticationInfo,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    Message,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import (
    InvalidParamsError,
    InvalidRequestError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from standardwebhooks import Webhook

from agentsvc.services import api_key_create
from runs.models import Run, RunEvent
from tests.conftest import fake, wait_until
from tests.fakes.tcp_proxy import TcpProxy
from tests.webhook_support import SECRET, hook_path

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

HTTP_JSON, JSONRPC = "HTTP+JSON", "JSONRPC"
SLOW = {"tokens": 30, "latency_ms": 60}


@pytest.fixture(autouse=True)
def _settled():
    yield
    wait_until(
        lambda: not Run.objects.filter(status__in=["queued", "running"]).exists(),
        60,
        message="runs to end",
    )


def text_message(*parts, **fields) -> Message:
    return Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=list(parts), **fields)


def send(data=None, *, immediately=False, parts=None, **fields) -> SendMessageRequest:
    parts = parts or [new_data_part(data if data is not None else {"topic": "tides"})]
    return SendMessageRequest(
        message=text_message(*parts),
        configuration=SendMessageConfiguration(return_immediately=immediately),
        **fields,
    )


def scenario(fn):
    return asyncio.run(fn())


class Agent:
    """An A2A client of a chain's agent (or the service's), made from its card."""

    def __init__(
        self, base, key, chain="demo", *, binding=HTTP_JSON, streaming=False, headers=None
    ):
        self.url = f"{base}/a2a/v1/chains/{chain}" if chain else f"{base}/a2a/v1"
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(headers={**auth, **(headers or {})}, timeout=60)
        self.config = ClientConfig(
            httpx_client=self.http, supported_protocol_bindings=[binding], streaming=streaming
        )

    async def __aenter__(self):
        self.client = await create_client(self.url, client_config=self.config)
        return self.client

    async def __aexit__(self, *exc):
        await self.client.close()
        await self.http.aclose()


async def task_until(client, task_id: str, state, seq: int = 0, timeout: float = 30):
    """The task once it is in `state` (and past `seq`), asked with GetTask (the test's event
    loop runs the client: no database reads here)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        task = await client.get_task(GetTaskRequest(id=task_id))
        if task.status.state == state and int(MessageToDict(task)["metadata"]["seq"]) >= seq:
            return task
        assert asyncio.get_running_loop().time() < deadline, f"task {task_id} stuck"
        await asyncio.sleep(0.05)


async def only(stream) -> object:
    (event,) = [e async for e in stream]
    return event


def update_of(event):
    """The status or artifact update a streamed event holds."""
    return event.status_update if event.HasField("status_update") else event.artifact_update


def seq(event) -> int:
    """An update's seq: the run event it comes from (the resume extension's metadata.seq)."""
    return int(MessageToDict(update_of(event))["metadata"]["seq"])


def test_cards_list_every_chain_and_point_at_its_endpoint(live_server_url, make_chain):
    make_chain(
        "demo",
        description="Writes about a topic.",
        schema={
            "type": "object",
            "required": ["topic"],
            "properties": {"topic": {"type": "string"}},
            "examples": [{"topic": "tides"}],
        },
    )
    make_chain(
        "shaped",
        schema={"type": "object", "properties": {"n": {"type": "integer"}}},
        output_schema={"type": "object", "properties": {"words": {"type": "integer"}}},
    )
    service = httpx.get(f"{live_server_url}/.well-known/agent-card.json").json()
    assert [s["id"] for s in service["skills"]] == ["demo", "shaped"]
    assert service["supportedInterfaces"][0] == {
        "url": f"{live_server_url}/a2a/v1",
        "protocolBinding": HTTP_JSON,
        "protocolVersion": "1.0",
    }
    card = httpx.get(f"{live_server_url}/a2a/v1/chains/demo/.well-known/agent-card.json").json()
    assert card["name"] == "demo" and card["description"] == "Writes about a topic."
    assert {i["protocolBinding"]: i["url"] for i in card["supportedInterfaces"]} == {
        HTTP_JSON: f"{live_server_url}/a2a/v1/chains/demo",
        JSONRPC: f"{live_server_url}/a2a/v1/chains/demo/jsonrpc",
    }
    assert card["securitySchemes"]["apiKey"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
    assert card["securityRequirements"] == [{"schemes": {"apiKey": {}}}]
    (resume,) = card["capabilities"]["extensions"]
    assert resume["params"] == {"header": "Last-Event-ID", "metadata_key": "seq"}
    (skill,) = card["skills"]
    assert skill["inputModes"] == ["application/json", "text/plain"]
    assert skill["examples"] == ['{"topic": "tides"}']
    shaped = httpx.get(f"{live_server_url}/a2a/v1/chains/shaped/.well-known/agent-card.json")
    assert shaped.json()["skills"][0]["inputModes"] == ["application/json"]
    assert shaped.json()["skills"][0]["outputModes"] == ["application/json"]
    missing = httpx.get(f"{live_server_url}/a2a/v1/chains/nope/.well-known/agent-card.json")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["detail"] == "No chain named 'nope'."


def test_send_at_once_then_get_and_the_rest_api_shows_the_same_run(
    live_server_url, worker, alice, make_chain
):
    make_chain("demo", models=[fake(tokens=4), fake(tokens=3)])

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            first = (await only(client.send_message(send(immediately=True)))).task
            return first, await task_until(client, first.id, TaskState.TASK_STATE_COMPLETED)

    first, task = scenario(run)
    assert first.status.state == TaskState.TASK_STATE_SUBMITTED
    assert not first.history  # the caller has the message it sent
    assert task.id == first.id and task.status.state == TaskState.TASK_STATE_COMPLETED
    rest = alice.get(f"/api/v1/runs/{task.id}").json()
    assert rest["status"] == "completed" and rest["input"] == {"topic": "tides"}
    (artifact,) = task.artifacts
    assert artifact.artifact_id == "output" and artifact.parts[0].text == rest["output"]
    assert MessageToDict(task.history[0])["parts"][0]["data"] == {"topic": "tides"}
    meta = MessageToDict(task)["metadata"]
    assert meta["run_id"] == task.id and meta["chain"] == "demo"
    assert int(meta["seq"]) == Run.objects.get(pk=task.id).last_seq


def test_blocking_send_answers_the_ended_task_and_takes_a_text_part(
    live_server_url, worker, alice, make_chain
):
    """A chain whose input is one required string takes a text part; without
    return_immediately the call waits for the end, as invoke does."""
    make_chain("demo", models=[fake(tokens=5, latency_ms=20)])

    async def run():
        async with Agent(live_server_url, alice.raw_key, binding=JSONRPC) as client:
            return (await only(client.send_message(send(parts=[new_text_part("tides")])))).task

    task = scenario(run)
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert Run.objects.get(pk=task.id).input == {"topic": "tides"}
    assert len(task.artifacts[0].parts[0].text.split()) == 5


def test_structured_output_is_a_data_part(live_server_url, worker, alice, make_chain):
    schema = {
        "type": "object",
        "required": ["summary", "words"],
        "properties": {"summary": {"type": "string"}, "words": {"type": "integer"}},
    }
    make_chain("demo", models=[fake(tokens=4, json=1)], output_schema=schema)

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            return (await only(client.send_message(send()))).task

    task = scenario(run)
    part = MessageToDict(task.artifacts[0])["parts"][0]
    assert part["mediaType"] == "application/json" and part["data"]["words"] == 4


def test_stream_sends_the_task_then_every_update_in_order(
    live_server_url, worker, alice, make_chain
):
    make_chain("demo", models=[fake(tokens=6, latency_ms=10), fake(tokens=4)])

    async def run():
        async with Agent(live_server_url, alice.raw_key, streaming=True) as client:
            return [e async for e in client.send_message(send())]

    events = scenario(run)
    first, updates = events[0], events[1:]
    assert first.task.status.state == TaskState.TASK_STATE_SUBMITTED
    run_id = first.task.id
    seqs = [seq(u) for u in updates]
    stored = list(RunEvent.objects.filter(run_id=run_id).order_by("seq").values_list("seq", "type"))
    assert sorted(set(seqs)) == [s for s, _ in stored][1:]  # every event after run.queued, once
    assert seqs == sorted(seqs)
    chunks = {}
    for u in updates:
        if u.HasField("artifact_update"):
            artifact = u.artifact_update.artifact
            text = "".join(p.text for p in artifact.parts)
            if u.artifact_update.append:
                chunks[artifact.artifact_id] += text
            else:
                chunks[artifact.artifact_id] = text
    assert len(chunks["agent-0"].split()) == 6 and len(chunks["agent-1"].split()) == 4
    assert chunks["output"] == Run.objects.get(pk=run_id).output
    statuses = [u.status_update for u in updates if u.HasField("status_update")]
    assert [s.status.message.parts[0].text for s in statuses if s.status.message.parts][:2] == [
        "agent0 started.",
        "agent0 done.",
    ]
    assert statuses[-1].status.state == TaskState.TASK_STATE_COMPLETED


def test_list_pages_the_owners_tasks_of_the_chain_and_cancel_maps_to_run_cancel(
    live_server_url, worker, alice, bob, make_chain
):
    make_chain("demo", models=[fake(**SLOW)])
    make_chain("other", models=[fake(tokens=1)])

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            ids = [(await only(client.send_message(send(immediately=True)))).task.id for _ in "abc"]
            async with Agent(live_server_url, alice.raw_key, "other") as other:
                await only(other.send_message(send(immediately=True)))
            page = await client.list_tasks(ListTasksRequest(page_size=2))
            rest = await client.list_tasks(
                ListTasksRequest(page_size=2, page_token=page.next_page_token)
            )
            cancelled = await client.cancel_task(CancelTaskRequest(id=ids[0]))
            again = await client.cancel_task(CancelTaskRequest(id=ids[0]))
            done = await client.list_tasks(ListTasksRequest(status=TaskState.TASK_STATE_CANCELED))
            for task_id in ids[1:]:
                await client.cancel_task(CancelTaskRequest(id=task_id))
            async with Agent(live_server_url, bob.raw_key) as theirs:
                empty = await theirs.list_tasks(ListTasksRequest())
                with pytest.raises(TaskNotFoundError):
                    await theirs.get_task(GetTaskRequest(id=ids[1]))
                with pytest.raises(TaskNotFoundError):
                    await theirs.cancel_task(CancelTaskRequest(id=ids[1]))
            return ids, page, rest, cancelled, again, done, empty

    ids, page, rest, cancelled, again, done, empty = scenario(run)
    assert [t.id for t in page.tasks] == ids[::-1][:2] and page.total_size == 3
    assert [t.id for t in rest.tasks] == ids[:1] and rest.next_page_token == ""
    assert not page.tasks[0].artifacts  # include_artifacts was not asked for
    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
    assert again.status.state == TaskState.TASK_STATE_CANCELED
    assert [t.id for t in done.tasks] == ids[:1]
    assert empty.total_size == 0 and not empty.tasks
    assert Run.objects.get(pk=ids[0]).cancel_reason == "api"


def test_cancel_of_an_ended_task_is_not_cancelable(live_server_url, worker, alice, make_chain):
    make_chain("demo", models=[fake(tokens=2)])

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            task = (await only(client.send_message(send()))).task
            with pytest.raises(TaskNotCancelableError) as refused:
                await client.cancel_task(CancelTaskRequest(id=task.id))
            return refused.value

    refused = scenario(run)
    assert refused.message == "The run has already completed."
    assert refused.data["code"] == "run_not_cancellable"


def test_subscribe_resumes_after_a_dropped_connection_each_event_exactly_once(
    live_server_url, worker, alice, make_chain
):
    """The stream is cut mid-run (a proxy drops the connection); subscribing again with
    Last-Event-ID: <last seq seen> replays every event after it once, then follows live."""
    make_chain("demo", models=[fake(tokens=25, latency_ms=40)])
    url = urlsplit(live_server_url)
    proxy = TcpProxy((url.hostname, url.port))

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            task = (await only(client.send_message(send(immediately=True)))).task
            await task_until(client, task.id, TaskState.TASK_STATE_WORKING, seq=5)
        first = []
        async with Agent(proxy.url, alice.raw_key, streaming=True) as through_proxy:
            with pytest.raises(A2AClientError):
                async for event in through_proxy.subscribe(SubscribeToTaskRequest(id=task.id)):
                    first.append(event)
                    if len(first) == 6:
                        proxy.drop_all()
        resume = ClientCallContext(service_parameters={"Last-Event-ID": str(seq(first[-1]))})
        async with Agent(live_server_url, alice.raw_key, streaming=True) as client:
            stream = client.subscribe(SubscribeToTaskRequest(id=task.id), context=resume)
            resumed = [e async for e in stream]
            with pytest.raises(UnsupportedOperationError):
                await only(client.subscribe(SubscribeToTaskRequest(id=task.id)))
            stream = client.subscribe(SubscribeToTaskRequest(id=task.id), context=resume)
            late = [e async for e in stream]
        return first, resumed, late

    first, resumed, late = scenario(run)
    proxy.close()
    # The task first, each time (A2A), and its seq is where the updates start.
    assert first[0].HasField("task") and resumed[0].HasField("task")
    start = int(MessageToDict(first[0].task)["metadata"]["seq"])
    updates = first[1:] + resumed[1:]
    assert [seq(u) for u in updates] == sorted(seq(u) for u in updates)
    assert set(map(seq, first[1:])).isdisjoint(map(seq, resumed[1:]))
    run_id = first[0].task.id
    stored = RunEvent.objects.filter(run_id=run_id, seq__gt=start).values_list("seq", flat=True)
    assert sorted({seq(u) for u in updates}) == list(stored)
    assert updates[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    # An ended task, resumed from the same seq: the same updates again, then the end.
    assert [seq(u) for u in late[1:]] == [seq(u) for u in resumed[1:]]


def test_push_notification_is_the_runs_webhook_signed_the_standard_webhooks_way(
    live_server_url, worker, alice, make_chain, receiver
):
    make_chain("demo", models=[fake(tokens=3)])
    path = hook_path()
    config = TaskPushNotificationConfig(
        url=receiver.base_url + path,
        authentication=AuthenticationInfo(scheme="StandardWebhooks", credentials=SECRET),
    )

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            request = send(immediately=True)
            request.configuration.task_push_notification_config.CopyFrom(config)
            task = (await only(client.send_message(request))).task
            listed = await client.list_task_push_notification_configs(
                ListTaskPushNotificationConfigsRequest(task_id=task.id)
            )
            bad = send(immediately=True)
            bad.configuration.task_push_notification_config.CopyFrom(
                TaskPushNotificationConfig(
                    url="http://169.254.169.254/latest",
                    authentication=AuthenticationInfo(scheme="Bearer", credentials="x"),
                )
            )
            with pytest.raises(InvalidParamsError) as scheme:
                await only(client.send_message(bad))
            bad.configuration.task_push_notification_config.authentication.scheme = (
                "StandardWebhooks"
            )
            bad.configuration.task_push_notification_config.authentication.credentials = SECRET
            with pytest.raises(InvalidParamsError) as private:
                await only(client.send_message(bad))
            return task, listed, scheme.value, private.value

    task, listed, scheme, private = scenario(run)
    (shown,) = listed.configs
    assert shown.url == config.url and shown.authentication.scheme == "StandardWebhooks"
    assert not shown.authentication.credentials  # the secret is never shown
    wait_until(lambda: receiver.requests_for(path), 30, message="the push notification")
    (received,) = receiver.requests_for(path)
    payload = Webhook(SECRET).verify(received.body, received.headers)
    assert payload["type"] == "run.completed" and payload["data"]["run_id"] == task.id
    field = "configuration.taskPushNotificationConfig"
    assert [e["field"] for e in scheme.data["errors"]] == [f"{field}.authentication.scheme"]
    assert [e["field"] for e in private.data["errors"]] == [f"{field}.url"]


def test_push_notification_configs_of_a_running_task(
    live_server_url, worker, alice, make_chain, receiver
):
    make_chain("demo", models=[fake(**SLOW)])
    path = hook_path()
    config = TaskPushNotificationConfig(
        url=receiver.base_url + path,
        authentication=AuthenticationInfo(scheme="StandardWebhooks", credentials=SECRET),
    )

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            task = (await only(client.send_message(send(immediately=True)))).task
            config.task_id = task.id
            made = await client.create_task_push_notification_config(config)
            got = await client.get_task_push_notification_config(
                GetTaskPushNotificationConfigRequest(task_id=task.id, id=made.id)
            )
            await client.delete_task_push_notification_config(
                DeleteTaskPushNotificationConfigRequest(task_id=task.id, id=made.id)
            )
            with pytest.raises(TaskNotFoundError):
                await client.get_task_push_notification_config(
                    GetTaskPushNotificationConfigRequest(task_id=task.id, id=made.id)
                )
            await client.create_task_push_notification_config(config)
            await client.cancel_task(CancelTaskRequest(id=task.id))
            return task, made, got

    task, made, got = scenario(run)
    assert made.id == got.id == "webhook" and got.url == config.url
    wait_until(lambda: receiver.requests_for(path), 30, message="the push notification")
    payload = Webhook(SECRET).verify(
        receiver.requests_for(path)[0].body, receiver.requests_for(path)[0].headers
    )
    assert payload["type"] == "run.cancelled" and payload["data"]["run_id"] == task.id


def test_refused_credentials_in_the_protocols_error_shape(live_server_url, alice, make_chain):
    make_chain("demo")
    url = f"{live_server_url}/a2a/v1/chains/demo/message:send"
    body = MessageToDict(send())
    none = httpx.post(url, json=body, headers={"A2A-Version": "1.0"})
    assert none.status_code == 401 and none.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    error = none.json()["error"]
    assert error["status"] == "UNAUTHENTICATED"
    assert error["message"] == "Send Authorization: Bearer <key> or X-API-Key: <key>."
    assert error["details"][0]["metadata"]["code"] == "authentication_failed"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer ak_" + "x" * 40})
    assert (
        wrong.status_code == 401
        and wrong.json()["error"]["message"] == "Unknown or revoked API key."
    )
    both = httpx.post(
        url,
        json=body,
        headers={"Authorization": f"Bearer {alice.raw_key}", "X-API-Key": alice.raw_key},
    )
    assert both.status_code == 400
    assert both.json()["error"]["details"][0]["metadata"]["code"] == "ambiguous_credentials"
    rpc = httpx.post(
        f"{live_server_url}/a2a/v1/chains/demo/jsonrpc",
        json={"jsonrpc": "2.0", "id": 7, "method": "GetTask", "params": {"id": "x"}},
    )
    assert rpc.status_code == 401 and rpc.json()["id"] == 7
    assert rpc.json()["error"]["data"][0]["reason"] == "AUTHENTICATION_FAILED"

    async def run():
        async with Agent(live_server_url, None) as client:
            with pytest.raises(A2AClientError, match="401"):
                await only(client.send_message(send()))

    scenario(run)


def test_a_key_over_its_active_runs_gets_rejected_tasks(live_server_url, worker, make_chain):
    make_chain("demo", models=[fake(**SLOW)])
    _, raw = api_key_create(owner_name="carol", name="one-at-a-time", max_active_runs=1)

    async def run():
        async with Agent(live_server_url, raw) as client:
            first = (await only(client.send_message(send(immediately=True)))).task
            second = (await only(client.send_message(send(immediately=True)))).task
            async with Agent(live_server_url, raw, streaming=True) as streaming:
                streamed = [e async for e in streaming.send_message(send())]
            await client.cancel_task(CancelTaskRequest(id=first.id))
            with pytest.raises(TaskNotFoundError):
                await client.get_task(GetTaskRequest(id=second.id))  # never a run
            return first, second, streamed

    first, second, streamed = scenario(run)
    assert first.status.state == TaskState.TASK_STATE_SUBMITTED
    assert second.status.state == TaskState.TASK_STATE_REJECTED
    assert second.status.message.parts[0].text == "This key already has 1 active runs (at most 1)."
    problem = MessageToDict(second)["metadata"]["problem"]
    assert problem["code"] == "concurrency_limit" and problem["status"] == 429
    assert problem["violated-policies"] == ["active_runs"] and problem["retry_after"] >= 1
    (only_event,) = streamed
    assert only_event.task.status.state == TaskState.TASK_STATE_REJECTED
    assert Run.objects.count() == 1


def test_an_input_the_schema_refuses_is_invalid_params_naming_the_field(
    live_server_url, alice, make_chain
):
    make_chain("demo")

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            with pytest.raises(InvalidParamsError) as typed:
                await only(client.send_message(send({"topic": 5})))
            with pytest.raises(InvalidParamsError) as two:
                await only(
                    client.send_message(send(parts=[new_text_part("a"), new_text_part("b")]))
                )
            return typed.value, two.value

    typed, two = scenario(run)
    incomplete = httpx.post(
        f"{live_server_url}/a2a/v1/chains/demo/message:send",
        json={"message": {"parts": []}},
        headers={"Authorization": f"Bearer {alice.raw_key}", "A2A-Version": "1.0"},
    )
    assert incomplete.status_code == 400
    (_, bad_request) = incomplete.json()["error"]["details"]
    assert [v["field"] for v in bad_request["fieldViolations"]] == [
        "message.message_id",
        "message.role",
        "message.parts",
    ]
    assert typed.message == "The input does not match the input schema of demo."
    assert typed.data["errors"] == [
        {"field": "message.parts[0].data.topic", "message": "5 is not of type 'string'"}
    ]
    assert two.data["errors"][0]["field"] == "message.parts"
    assert not Run.objects.exists()


def test_the_service_endpoint_takes_the_chain_from_metadata_skill(
    live_server_url, worker, alice, make_chain
):
    make_chain("demo", models=[fake(tokens=2)])

    async def run():
        async with Agent(live_server_url, alice.raw_key, chain=None) as client:
            request = send()
            request.metadata.update({"skill": "demo", "customer": "c1"})
            task = (await only(client.send_message(request))).task
            with pytest.raises(InvalidParamsError) as unnamed:
                await only(client.send_message(send()))
            listed = await client.list_tasks(ListTasksRequest())
            return task, unnamed.value, listed

    task, unnamed, listed = scenario(run)
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert Run.objects.get(pk=task.id).metadata == {"customer": "c1"}
    assert unnamed.data["errors"][0]["field"] == "metadata.skill"
    assert [t.id for t in listed.tasks] == [task.id]


def test_an_idempotency_key_makes_a_retried_send_the_same_task(
    live_server_url, worker, alice, make_chain
):
    make_chain("demo", models=[fake(tokens=2)])
    key = str(uuid.uuid4())

    async def run():
        async with Agent(
            live_server_url, alice.raw_key, headers={"Idempotency-Key": key}
        ) as client:
            request = send(immediately=True)
            first = (await only(client.send_message(request))).task
            again = (await only(client.send_message(request))).task
            with pytest.raises(InvalidRequestError) as reused:
                await only(client.send_message(send({"topic": "other"}, immediately=True)))
            return first, again, reused.value

    first, again, reused = scenario(run)
    assert first.id == again.id and Run.objects.count() == 1
    assert reused.message == "This Idempotency-Key was used with a different request body."
    assert reused.data["code"] == "idempotency_key_reused"


def test_context_ids_group_tasks(live_server_url, worker, alice, make_chain):
    make_chain("demo", models=[fake(tokens=2)])

    async def run():
        async with Agent(live_server_url, alice.raw_key) as client:
            given = send(immediately=True)
            given.message.context_id = "conversation-1"
            mine = (await only(client.send_message(given))).task
            other = (await only(client.send_message(send(immediately=True)))).task
            grouped = await client.list_tasks(ListTasksRequest(context_id="conversation-1"))
            alone = await client.list_tasks(ListTasksRequest(context_id=other.context_id))
            return mine, other, grouped, alone

    mine, other, grouped, alone = scenario(run)
    assert mine.context_id == "conversation-1" and other.context_id == other.id
    assert [t.id for t in grouped.tasks] == [mine.id]
    assert [t.id for t in alone.tasks] == [other.id]
