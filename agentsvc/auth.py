from __future__ import annotations

from rest_framework import authentication, exceptions

from agentsvc.services import api_key_authenticate


def raw_key_from_headers(headers) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    auth = headers.get("Authorization", "")
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
