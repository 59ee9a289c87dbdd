from __future__ import annotations

from django.http import Http404, HttpResponse, JsonResponse
from django.utils.html import escape

from agentsvc.errors import PROBLEMS, problem_response


def healthz(request):
    return JsonResponse({"status": "ok"})


def problem_page(request, code: str):
    """Human-readable page behind each problem's `type`."""
    if code not in PROBLEMS:
        raise Http404
    status, title, text = PROBLEMS[code]
    return HttpResponse(
        f"<!doctype html><title>{escape(title)}</title><h1>{escape(title)}</h1>"
        f"<p>HTTP {status}, code <code>{escape(code)}</code>.</p><p>{escape(text)}</p>",
        content_type="text/html; charset=utf-8",
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
