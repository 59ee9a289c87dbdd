"""The HTTP handler: Django's ASGI handler, with sync views served in one thread hop.

Under ASGI, Django runs its middleware chain in async mode, and each sync middleware method
(sessions, CSRF, auth, messages...) is a separate hop to the request's thread and back, as is
the view: about fifteen hops per API call, which cost more CPU than the call's own work. Here a
request whose view is sync runs the sync middleware chain and the view together in one hop, as
under WSGI. Async views (the SSE streams) keep the async chain and run on the event loop.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousOperation
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler
from django.http import Http404
from django.urls import Resolver404, get_resolver

from agentsvc import logs
from agentsvc.errors import problem_response


class _SyncChain(BaseHandler):
    def __init__(self) -> None:
        super().__init__()
        self.load_middleware(is_async=False)


class OneHopASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self.sync_chain = _SyncChain()
        self.resolver = get_resolver()

    def _view_is_async(self, path: str) -> bool:
        try:
            view = self.resolver.resolve(path).func
        except Resolver404:
            return False
        return iscoroutinefunction(view)

    async def run_get_response(self, request):
        if self._view_is_async(request.path_info):
            return await super().run_get_response(request)
        response = await sync_to_async(self.sync_chain.get_response, thread_sensitive=True)(request)
        response._handler_class = self.__class__
        return response


class StaticFilesHandler(ASGIStaticFilesHandler):
    """The in-process static files, where a missing file or a path that climbs out of them is a
    404 problem+json, as the API answers.

    For `/static/../agentsvc/settings.py` (or `%2e%2e`, `..%2f`, which the server decodes to the
    same path) the finders raise SuspiciousFileOperation. Django's static handler only catches
    Http404 and runs outside the middleware chain, so that was a 500 with a traceback logged at
    ERROR on every such request; its Http404 was Django's HTML page.
    """

    def serve(self, request):
        try:
            return super().serve(request)
        except (Http404, SuspiciousOperation):
            return problem_response(request, "not_found", "No such file.")


class NoRouteConsumer(AsyncWebsocketConsumer):
    """A WebSocket to a path no route knows: accepted, then closed with 4404, the close code of
    a run that does not exist (browsers only see close codes after an accept). Channels'
    URLRouter raises for such a path, which daphne answered with a bare 500 and an ERROR
    traceback per request, for anyone, without a key."""

    async def connect(self) -> None:
        await self.accept()
        await self.close(4404)


class RequestIdMiddleware:
    """ASGI: the request id for the whole of an HTTP request or WebSocket connection.

    Its task's log context carries it from the first line to the last (also Django's own
    `django.request` lines written after the middleware chain, and the consumers' of a socket),
    Django's RequestContextMiddleware takes it from `scope["request_id"]`, and every response
    start (static files and crashes too) carries `X-Request-ID`. WebSocket accepts get the
    header as well, for servers that send accept headers (daphne does not)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        request_id = logs.request_id_from(given)
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                headers = list(message.get("headers") or ())
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message = {**message, "headers": [*headers, header]}
            await send(message)

        tokens = logs.bind(request_id=request_id)
        try:
            return await self.app({**scope, "request_id": request_id}, receive, send_with_id)
        finally:
            logs.unbind(tokens)


def daphne_raw_bodies() -> None:
    """Under daphne, hand request bodies to the application unparsed.

    daphne builds each request on Twisted's `http.Request`, which by default parses a POST body
    sent as a form (`parsePOSTFormSubmission`) into `request.args`, a dict daphne never reads:
    the application gets the raw body. The parse runs the email package's header parser on
    every POST's Content-Type (about a quarter of a run create's CPU), holds a multipart upload
    in memory, and answers a malformed one with a bare 400 before the application can answer
    its problem+json 415. The request class daphne's HTTP factory builds is swapped for one that
    turns the parse off, where Twisted's Request takes the parameter."""
    import inspect
    import sys

    if "daphne.server" not in sys.modules:  # another server: nothing to do
        return
    from daphne import http_protocol
    from twisted.web import http

    if getattr(http_protocol.WebRequest, "raw_bodies", False):
        return
    if "parsePOSTFormSubmission" not in inspect.signature(http.Request.__init__).parameters:
        return

    class RawBodyRequest(http_protocol.WebRequest):
        raw_bodies = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    http_protocol.WebRequest = RawBodyRequest  # read by HTTPFactory.buildProtocol
