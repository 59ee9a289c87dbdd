"""`/mcp`: the MCP server over streamable HTTP, `mcp`'s session manager, stateless (every
request stands alone, so any web process answers any request)."""

from __future__ import annotations

import asyncio

from django.conf import settings
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings

from interop.mcp.server import mcp_server


class McpApp:
    """ASGI. The session manager runs in a task of its own on the event loop that serves (the
    ASGI server here sends no lifespan events), started by the first request."""

    def __init__(self) -> None:
        self.server = mcp_server()
        self._managers: dict[asyncio.AbstractEventLoop, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()

    async def _manager(self) -> StreamableHTTPSessionManager:
        loop = asyncio.get_running_loop()
        ready = self._managers.get(loop)
        if ready is None:
            ready = self._managers[loop] = loop.create_future()
            self._tasks.add(loop.create_task(self._run(ready)))
        return await asyncio.shield(ready)

    async def _run(self, ready: asyncio.Future) -> None:
        manager = StreamableHTTPSessionManager(
            app=self.server,
            stateless=True,
            # Hosts and origins are checked before the request gets here (interop.asgi).
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_request_body_size=settings.MAX_REQUEST_BYTES,
        )
        try:
            async with manager.run():
                ready.set_result(manager)
                await asyncio.Event().wait()  # for the life of the process
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    async def __call__(self, scope, receive, send) -> None:
        manager = await self._manager()
        await manager.handle_request(scope, receive, send)
