"""The A2A routes: `a2a-sdk`'s HTTP+JSON and JSON-RPC routes on our request handler, for
each chain's endpoint (`/a2a/v1/chains/{name}`) and for the service's (`/a2a/v1`), and the
agent cards."""

from __future__ import annotations

from a2a.auth.user import User
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
from a2a.server.routes.rest_routes import create_rest_routes
from django.http import Http404
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from agentsvc.db import db_async
from agentsvc.errors import ApplicationError
from interop import calls
from interop.a2a import cards
from interop.a2a.handler import ChainsRequestHandler
from runs import selectors
from runs.api import chain_not_found

CALLER = "agentsvc.caller"  # the scope keys interop.asgi sets: the authenticated caller,
BASE_URL = "agentsvc.base_url"  # and the scheme and host the cards' URLs start with


class KeyUser(User):
    """The caller's key, as the SDK's context names a user."""

    def __init__(self, caller: calls.Caller) -> None:
        self.caller = caller

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self.caller.key.owner.name


class CallerContextBuilder(DefaultServerCallContextBuilder):
    """The SDK's call context (headers, requested extensions), with the caller in its state."""

    def build(self, request: Request):
        context = super().build(request)
        context.state["caller"] = request.scope[CALLER]
        return context

    def build_user(self, request: Request) -> User:
        return KeyUser(request.scope[CALLER])


def problem_response(problem: calls.Problem) -> Response:
    return JSONResponse(
        problem.body,
        status_code=problem.status,
        headers=problem.headers,
        media_type="application/problem+json",
    )


def _base_url(request: Request) -> str:
    return request.scope[BASE_URL]  # scheme and the checked host (interop.asgi)


async def service_card(request: Request) -> Response:
    chains = await db_async(selectors.chain_latest_list)()
    return JSONResponse(agent_card_to_dict(cards.service_card(chains, _base_url(request))))


async def chain_card(request: Request) -> Response:
    name = request.path_params["chain"]
    try:
        chain = await db_async(selectors.chain_get)(name=name)
    except Http404:
        return problem_response(calls.problem_of(chain_not_found(name, None), request.url.path))
    return JSONResponse(agent_card_to_dict(cards.chain_card(chain, _base_url(request))))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Paths and methods no route serves: the API's problem answers."""
    if exc.status_code == 405:
        error = ApplicationError("method_not_allowed", headers=dict(exc.headers or {}))
    else:
        error = ApplicationError("not_found", "Not found.", status=exc.status_code)
    return problem_response(calls.problem_of(error, request.url.path))


def a2a_app() -> Starlette:
    handler = ChainsRequestHandler()
    builder = CallerContextBuilder()
    # The SDK also mounts the routes under /{tenant}: a chain is an endpoint of its own here.
    rest = [r for r in create_rest_routes(handler, builder) if not isinstance(r, Mount)]
    endpoint = [*create_jsonrpc_routes(handler, "/jsonrpc", builder), *rest]
    return Starlette(
        routes=[
            Route("/.well-known/agent-card.json", service_card, methods=["GET"]),
            Mount(
                "/a2a/v1/chains/{chain}",
                routes=[
                    Route("/.well-known/agent-card.json", chain_card, methods=["GET"]),
                    *endpoint,
                ],
            ),
            Mount(
                "/a2a/v1",
                routes=[
                    # The service's card also beside its endpoint, where clients look first.
                    Route("/.well-known/agent-card.json", service_card, methods=["GET"]),
                    *endpoint,
                ],
            ),
        ],
        exception_handlers={404: _http_error, 405: _http_error},
    )
