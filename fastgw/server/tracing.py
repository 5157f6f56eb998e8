"""OTLP span export for sampled requests (`tracing.otlp_endpoint`).

The data plane propagates W3C `traceparent` always and decides sampling itself (the caller's flag,
or `tracing.sample_ratio` for traces that start here); for a sampled request it hands one tuple to
the tracer built here, which turns it into an OpenTelemetry span and gives it to the SDK's batch
processor (its own thread, batching, retries, OTLP/HTTP protobuf). Needs the `otel` extra:
`pip install 'fastgw[otel]'` (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http).
"""
from __future__ import annotations

from fastgw import __version__

# Order of the tuple built by export_span (fastgw/_core/observe.pyx).
SPAN_FIELDS = ("trace_id", "span_id", "parent_span_id", "start_ns", "end_ns", "method", "host",
               "path", "status", "flags", "route", "service", "upstream", "client_ip")


class SpanExporter:
    """callable(span tuple); `close()` flushes what is queued."""

    def __init__(self, endpoint: str, service_name: str = "fastgw"):
        # The otel extra is optional (config/validate.py's otel_missing says when it is absent).
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        self._ReadableSpan, self._SpanContext, self._Status = ReadableSpan, SpanContext, Status
        self._kind, self._codes, self._sampled = SpanKind.SERVER, StatusCode, TraceFlags(TraceFlags.SAMPLED)
        self._resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self._scope = InstrumentationScope("fastgw", __version__)
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))

    def __call__(self, record: tuple) -> None:
        s = dict(zip(SPAN_FIELDS, record))
        trace_id = int(s["trace_id"], 16)
        context = self._SpanContext(trace_id, int(s["span_id"], 16), is_remote=False,
                                    trace_flags=self._sampled)
        parent = (self._SpanContext(trace_id, int(s["parent_span_id"], 16), is_remote=True,
                                    trace_flags=self._sampled)
                  if s["parent_span_id"] else None)
        attributes = {
            "http.request.method": s["method"], "url.path": s["path"], "server.address": s["host"],
            "http.response.status_code": s["status"], "client.address": s["client_ip"],
        }
        for key in ("route", "service", "upstream", "flags"):
            if s[key]:
                attributes[f"fastgw.{key}"] = s[key]
        status = self._Status(self._codes.ERROR if s["status"] >= 500 else self._codes.UNSET)
        name = f"{s['method']} {s['route']}" if s["route"] else s["method"]
        self._processor.on_end(self._ReadableSpan(
            name=name, context=context, parent=parent, resource=self._resource,
            attributes=attributes, kind=self._kind, status=status, start_time=s["start_ns"],
            end_time=s["end_ns"], instrumentation_scope=self._scope))

    def close(self) -> None:
        self._processor.shutdown()


def open_tracer(spec) -> SpanExporter | None:
    if spec.otlp_endpoint is None:
        return None
    return SpanExporter(spec.otlp_endpoint)
