"""The process's TracerProvider, when the application has not set one: OTLP/HTTP."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider


def install_provider(service_name: str | None = None) -> bool:
    """Set an OTLP/HTTP TracerProvider, configured by the OTEL_* variables, unless the
    application set one. Returns whether it did."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False  # the application's own: sagaline's spans go there
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if (
        service_name
        and not os.environ.get("OTEL_SERVICE_NAME")
        and "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    ):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    # The sampler comes from OTEL_TRACES_SAMPLER, the exporter's endpoint, headers and
    # timeout from OTEL_EXPORTER_OTLP_*, the batching from OTEL_BSP_*.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return isinstance(trace.get_tracer_provider(), TracerProvider)
