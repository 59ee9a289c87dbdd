from __future__ import annotations

from rest_framework.negotiation import DefaultContentNegotiation


class JSONContentNegotiation(DefaultContentNegotiation):
    """Answer JSON whatever the Accept header says: the API has one representation."""

    def select_renderer(self, request, renderers, format_suffix=None):
        renderer = renderers[0]
        return renderer, renderer.media_type
