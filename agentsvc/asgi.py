"""ASGI entry point: HTTP (API, SSE, admin) through Django, WebSocket through Channels."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsvc.settings")

# Django must be set up before the consumers (and their models) are imported.
django.setup(set_prefix=False)

from agentsvc.handlers import (  # noqa: E402
    NoRouteConsumer,
    OneHopASGIHandler,
    RequestIdMiddleware,
    StaticFilesHandler,
    daphne_raw_bodies,
)
from agentsvc.lane import Lane  # noqa: E402
from interop.asgi import interop_mount  # noqa: E402

django_asgi_app = OneHopASGIHandler()
daphne_raw_bodies()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import re_path  # noqa: E402

from runs.routing import websocket_urlpatterns  # noqa: E402


class BrowserOriginValidator:
    """Checks Origin against ALLOWED_HOSTS whenever a client sends one.

    Browsers always send Origin on a WebSocket handshake, and only browsers can ride a victim's
    session cookie across sites, so that is where the check matters. Programs that send no Origin
    (an API key in the Authorization header) are let through to authenticate as usual.
    """

    def __init__(self, app):
        self.app = app
        self.checked = AllowedHostsOriginValidator(app)

    async def __call__(self, scope, receive, send):
        if any(name == b"origin" for name, _ in scope.get("headers", ())):
            return await self.checked(scope, receive, send)
        return await self.app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        # The hottest API calls on the fast lane; static files (admin, API docs) served
        # in-process from the installed apps: few, small, and no outside network or build step
        # needed. Everything else goes to Django.
        # A2A and MCP (interop) beside the lane.
        "http": RequestIdMiddleware(interop_mount(Lane(StaticFilesHandler(django_asgi_app)))),
        "websocket": RequestIdMiddleware(
            BrowserOriginValidator(
                AuthMiddlewareStack(
                    # Last, for every path the routes above do not match: close 4404.
                    URLRouter([*websocket_urlpatterns, re_path(r"", NoRouteConsumer.as_asgi())])
                )
            )
        ),
    }
)
