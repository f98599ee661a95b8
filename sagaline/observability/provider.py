"""The process's TracerProvider, when the application has not set one: OTLP/HTTP."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider


class _HashedResource(Resource):
    """A Resource that computes its hash once. The OTLP encoder groups each batch's
    spans by resource, hashing it once per span, and Resource's hash serialises all of
    its attributes to JSON every time; its attributes never change."""

    _hash: int | None = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = super().__hash__()
        return self._hash


def install_provider(service_name: str | None = None) -> bool:
    """Set an OTLP/HTTP TracerProvider, configured by the OTEL_* variables, unless the
    application set one. Returns whether it did."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False  # the application's own: sagaline's spans go there
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
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
    provider = TracerProvider(resource=_HashedResource(resource.attributes, resource.schema_url))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def preload_exporter() -> None:
    """Import what `install_provider` needs, now: in a worker this runs before the pool
    forks, so a pool process (each one a replacement restarts too) does not spend its
    first traced task importing the OTLP exporter and its HTTP client (50 ms on an idle
    machine, a few hundred under load). Nothing is set up: the provider and its export
    thread are still made in each process at first use."""
    import contextlib
    import importlib

    for name in (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.sdk.trace.export",
        "requests",  # the exporter's HTTP client, imported when the exporter is made
    ):
        # Missing: reported where it is needed, by install_provider.
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
