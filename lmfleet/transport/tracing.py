"""OpenTelemetry spans for routed requests, in the client transport and the proxy alike.

Off unless configured: lmfleet traces when the application installed an
OpenTelemetry SDK tracer provider itself, or when the standard environment asks for
an exporter (`OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true` turns it off): then it
installs the SDK's provider with a batching OTLP exporter, which reads the rest of
its settings (endpoint, headers, protocol) from the same variables. The packages
are the `[otel]` extra; asked for without them, a warning says so once and nothing
is traced. Off, a request pays one `None` test per attempt.

Per routed request (transport/plan.py, every plan): a `lmfleet.request` span (its
parent the caller's W3C trace context: the request's `traceparent` header, else the
current context), a `route` event per lease (the strategy, the node chosen, the
candidates with their scores), a `failover` event per failed attempt with its
reason, a `continuation` event when a cut generation goes on elsewhere; and per
attempt a `lmfleet.attempt` client span (the node, its outcome), with a
`first_byte` event, ended with the stream. The node receives the attempt's context
as its `traceparent`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

log = logging.getLogger("lmfleet")

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_installed: Any = None
"""The provider lmfleet installed from the environment (once per process)."""
_warned = False


def asked_by_environment() -> bool:
    """Whether the standard `OTEL_*` variables ask for traces to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(os.environ.get(name) for name in _ENDPOINTS)


def tracer() -> Any | None:
    """lmfleet's tracer, or None when tracing is off (see the module docstring)."""
    global _installed, _warned
    try:
        from opentelemetry import trace
    except ImportError:
        if asked_by_environment() and not _warned:
            _warned = True
            log.warning(
                "OTEL_* asks for traces, but OpenTelemetry is not installed: "
                "pip install 'lmfleet[otel]'; nothing is traced"
            )
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # nobody installed an SDK
        if not asked_by_environment():
            return None
        if _installed is None:
            _installed = _from_environment()
            if _installed is None:
                return None
            trace.set_tracer_provider(_installed)
        provider = trace.get_tracer_provider()
    return provider.get_tracer("lmfleet")


def _from_environment() -> Any | None:
    """The SDK's provider with a batching OTLP exporter, as the environment says."""
    global _warned
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        if not _warned:
            _warned = True
            log.warning(
                "OTEL_* asks for traces, but the OpenTelemetry SDK or its OTLP exporter "
                "is not installed: pip install 'lmfleet[otel]'; nothing is traced"
            )
        return None
    service = os.environ.get("OTEL_SERVICE_NAME") or "lmfleet"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def start_request(tracer: Any, method: str, path: str, headers: Any, **attributes: Any) -> Any:
    """The span of one routed request, child of the caller's trace context."""
    from opentelemetry import context, propagate

    carrier = {k: v for k, v in headers.items() if k.lower() in TRACE_HEADERS}
    parent = propagate.extract(carrier) if carrier else context.get_current()
    shown = {k: v for k, v in attributes.items() if v is not None}
    return tracer.start_span(
        "lmfleet.request",
        context=parent,
        attributes={"http.request.method": method, "url.path": path, **shown},
    )


def start_attempt(tracer: Any, request_span: Any, url: str, number: int) -> Any:
    """The client span of one attempt on the node at `url`."""
    from opentelemetry import trace

    parent = trace.set_span_in_context(request_span)
    return tracer.start_span(
        "lmfleet.attempt",
        context=parent,
        kind=trace.SpanKind.CLIENT,
        attributes={"server.address": url, "lmfleet.attempt": number},
    )


def inject(headers: MutableMapping[str, str], span: Any) -> None:
    """Give the node `span`'s context as its `traceparent` (and `tracestate`)."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    for name, value in carrier.items():
        headers[name] = value


TRACE_HEADERS = ("traceparent", "tracestate")


def carry(source: Any, target: MutableMapping[str, str]) -> None:
    """Copy the trace context `source` (a routed request's headers: the caller's, or
    its attempt's once injected) holds onto a call the plan makes for it on the same
    node (a scoring `/generate`, a DistServe phase): the node sees one trace."""
    for name in TRACE_HEADERS:
        value = source.get(name)
        if value is not None:
            target[name] = value


def end(span: Any, error: str | None = None, **attributes: Any) -> None:
    """End `span`, marked an error with `error`'s description."""
    from opentelemetry.trace import Status, StatusCode

    for name, value in attributes.items():
        if value is not None:
            span.set_attribute(name, value)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
