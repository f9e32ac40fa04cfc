"""OpenTelemetry export of the request log (the `otel` extra): each row becomes a span with the GenAI
semantic-convention attributes (tunelab.ops.requestlog.attributes), sent to any collector over OTLP (Phoenix,
Langfuse, Jaeger) or to any SDK SpanExporter (the tests use the in-memory one)."""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.ops.requestlog import LogRow, attributes

INSTALL = "pip install 'tunelab[otel]'"


def _sdk():
    try:
        from opentelemetry.sdk import trace

        return trace
    except ImportError:
        raise TunelabError(f"OTLP export needs the OpenTelemetry SDK: {INSTALL}") from None


class OtelSink:
    """Spans for request-log rows, through one SpanExporter. The LogWriter calls `export(rows)` on its own
    thread after each batch, so spans never cost a request anything."""

    def __init__(self, exporter, batch: bool = False, service_name: str = "tunelab"):
        """exporter: an opentelemetry-sdk SpanExporter. batch: hand spans to a BatchSpanProcessor (a network
        exporter) instead of exporting each one at once (the in-memory exporter)."""
        trace = _sdk()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.provider = trace.TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor((BatchSpanProcessor if batch else SimpleSpanProcessor)(exporter))
        self.tracer = self.provider.get_tracer("tunelab.ops.requestlog")

    @classmethod
    def otlp(cls, endpoint: str) -> OtelSink:
        """Spans to an OTLP/HTTP collector, e.g. http://localhost:4318/v1/traces."""
        _sdk()
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TunelabError(f"--otlp needs the OTLP exporter: {INSTALL}") from None
        return cls(OTLPSpanExporter(endpoint=endpoint), batch=True)

    def export(self, rows: list[LogRow]) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        for r in rows:
            attrs = attributes(r)
            start = int(r.ts * 1e9)
            span = self.tracer.start_span(f"{attrs['gen_ai.operation.name']} {r.model}", kind=SpanKind.SERVER,
                                          start_time=start, attributes=attrs)
            if r.outcome in ("error", "blocked"):
                span.set_status(Status(StatusCode.ERROR, r.outcome))
            span.end(end_time=start + int(r.latency_s * 1e9))

    def close(self) -> None:
        self.provider.shutdown()
