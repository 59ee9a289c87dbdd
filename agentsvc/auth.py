from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from agentsvc.errors import ApplicationError
from agentsvc.services import api_key_authenticate


class Headers(dict):
    """Request headers by lower-case name, read with any case (as Django's `request.headers`):
    what `raw_key_from_headers` reads on paths outside Django's request (ASGI scopes)."""

    @classmethod
    def from_scope(cls, scope: dict) -> Headers:
        return cls((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> Any:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


def raw_key_from_headers(headers) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`: the one reading of
    credentials for every transport (DRF, the fast lane, SSE, WebSocket). Both headers at once
    are refused (400 ambiguous_credentials) rather than one of them picked: a proxy or client
    that adds its own key beside the caller's would otherwise act as whichever header wins."""
    auth = headers.get("Authorization", "")
    if auth.strip() and headers.get("X-API-Key", "").strip():
        raise ApplicationError(
            "ambiguous_credentials", "Send the key in Authorization or in X-API-Key, not both."
        )
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return headers.get("X-API-Key") or None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        raw = raw_key_from_headers(request.headers)
        if raw is None:
            if "Authorization" in request.headers or "X-API-Key" in request.headers:
                raise exceptions.AuthenticationFailed("Malformed credentials: use Bearer <key>.")
            return None
        key = api_key_authenticate(raw=raw)
        if key is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        return (key.owner, key)

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
