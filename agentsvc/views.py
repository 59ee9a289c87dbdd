from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import render
from drf_spectacular.renderers import (
    OpenApiJsonRenderer,
    OpenApiJsonRenderer2,
    OpenApiYamlRenderer,
    OpenApiYamlRenderer2,
)
from drf_spectacular.views import SpectacularAPIView
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework.negotiation import DefaultContentNegotiation

from agentsvc.errors import PROBLEMS, problem_response
from agentsvc.health import readiness
from agentsvc.metrics import metrics_text


def healthz(request):
    """Liveness: the process answers. Nothing else is checked."""
    return JsonResponse({"status": "ok"})


def readyz(request):
    """The status for every balancer; the checks (backends, worker count, model names) only
    for operators: see `readiness_detail_allowed`."""
    ready, checks = readiness()
    body: dict = {"status": "ready" if ready else "not_ready"}
    if readiness_detail_allowed(request):
        body["checks"] = checks
    return JsonResponse(body, status=200 if ready else 503)


def _has_metrics_token(request) -> bool:
    token = settings.METRICS_TOKEN
    return bool(token) and hmac.compare_digest(
        request.headers.get("Authorization", ""), f"Bearer {token}"
    )


def readiness_detail_allowed(request) -> bool:
    """The metrics token, or a direct request from READYZ_DETAIL_NETWORKS (loopback by default
    when no token is set). A request that came through a proxy (Forwarded, X-Forwarded-For)
    is not direct: the proxy's own address says nothing about who asked."""
    if _has_metrics_token(request):
        return True
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(
        address.version == network.version and address in network
        for network in (
            ipaddress.ip_network(n, strict=False) for n in settings.READYZ_DETAIL_NETWORKS
        )
    )


def metrics(request):
    if settings.METRICS_TOKEN and not _has_metrics_token(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    return HttpResponse(metrics_text(), content_type=CONTENT_TYPE_LATEST)


def problem_page(request, code: str):
    """Human-readable page behind each problem's `type`."""
    if code not in PROBLEMS:
        raise Http404
    status, title, text = PROBLEMS[code]
    return render(
        request, "problem.html", {"code": code, "status": status, "title": title, "text": text}
    )


def handler404(request, exception=None):
    if request.path.startswith("/api/"):
        return problem_response(request, "not_found", "No such resource.")
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request):
    if request.path.startswith("/api/"):
        return problem_response(request, "server_error")
    from django.views.defaults import server_error

    return server_error(request)


class SchemaView(SpectacularAPIView):
    """GET /api/v1/schema: YAML by default; JSON to `Accept: application/json` (or
    `application/vnd.oai.openapi+json`) and to `?format=json`. The API's own negotiation answers
    JSON whatever is asked, which would answer YAML here: this view negotiates for real."""

    content_negotiation_class = DefaultContentNegotiation
    # `?format=json` picks the first JSON renderer: plain application/json.
    renderer_classes = [
        OpenApiYamlRenderer,
        OpenApiYamlRenderer2,
        OpenApiJsonRenderer2,
        OpenApiJsonRenderer,
    ]
