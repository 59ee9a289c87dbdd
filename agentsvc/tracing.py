"""OpenTelemetry traces, off unless OTEL_EXPORTER_OTLP_ENDPOINT is set.

A run's trace covers the request that created it, its execution in an executor, each model call
and each webhook attempt. The trace travels with the run: `run_create` stores the W3C
traceparent of the request's span on the Run, and the executor and the delivery pump start their
spans as its children.

The tracer provider is this module's own, not OpenTelemetry's global one (which can be set once
per process): `tracing_configure` installs one (start-up, or a test with its exporter) and
`tracing_reset` puts back the previous one. The current span still lives in OpenTelemetry's
context (context variables), so it follows requests and runs as the log fields do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_propagator = TraceContextTextMapPropagator()
_noop = trace.NoOpTracer()


def tracing_configure(
    exporter: SpanExporter, *, service_name: str = "agentsvc", batch: bool = True
) -> TracerProvider | None:
    """Send this process's spans to `exporter`; returns the provider this replaces."""
    global _provider
    previous = _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _provider = provider
    return previous


def tracing_reset(previous: TracerProvider | None = None) -> None:
    """Stop the current provider (flushing its spans) and put `previous` back."""
    global _provider
    if _provider is not None and _provider is not previous:
        _provider.shutdown()
    _provider = previous


def tracing_from_settings() -> None:
    """At start-up: OTLP over HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, if it is set."""
    from django.conf import settings

    if not settings.OTEL_EXPORTER_OTLP_ENDPOINT or _provider is not None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The exporter reads OTEL_EXPORTER_OTLP_ENDPOINT (and _HEADERS, _TIMEOUT...) and appends
    # /v1/traces to it, as the specification says.
    tracing_configure(OTLPSpanExporter(), service_name=settings.OTEL_SERVICE_NAME)


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    return _provider.get_tracer("agentsvc") if _provider is not None else _noop


def traceparent() -> str:
    """The W3C traceparent of the current span, or "" when there is none (tracing off)."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def parent_context(traceparent: str | None) -> Context | None:
    """The context to start a child span of a stored traceparent in (None: a new trace)."""
    if not traceparent:
        return None
    context = _propagator.extract({"traceparent": traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def headers_context(headers: Mapping[str, str]) -> Context | None:
    """A caller's traceparent (and tracestate), if it sent one."""
    if "traceparent" not in headers:
        return None
    return _propagator.extract({k.lower(): v for k, v in headers.items()})
