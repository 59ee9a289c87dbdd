from __future__ import annotations

import hmac

from django.conf import settings
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import render
from prometheus_client import CONTENT_TYPE_LATEST

from agentsvc.errors import PROBLEMS, problem_response
from agentsvc.health import readiness
from agentsvc.metrics import metrics_text


def healthz(request):
    """Liveness: the process answers. Nothing else is checked."""
    return JsonResponse({"status": "ok"})


def readyz(request):
    ready, checks = readiness()
    return JsonResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )


def metrics(request):
    token = settings.METRICS_TOKEN
    if token and not hmac.compare_digest(
        request.headers.get("Authorization", ""), f"Bearer {token}"
    ):
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
