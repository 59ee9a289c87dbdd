"""WebSocket routes (docs/api.md section 5)."""

from __future__ import annotations

from django.urls import path

from runs import consumers

websocket_urlpatterns = [
    path("ws/v1/runs/<uuid:run_id>", consumers.RunEventsConsumer.as_asgi()),
    path("ws/v1/runs", consumers.RunFeedConsumer.as_asgi()),
]
