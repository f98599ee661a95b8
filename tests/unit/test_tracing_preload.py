"""With tracing on, `init_app` imports the OTLP exporter before a worker's pool forks,
so that no pool process spends its first traced task on those imports; it sets no
TracerProvider (an application that sets its own later still wins). With tracing
off, none of it is imported."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from celery import Celery
from opentelemetry import trace
import sagaline

app = Celery("w", broker="memory://")
sagaline.init_app(app, store="redis://127.0.0.1:1/0", sweeper=False, tracing={tracing!r})
names = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "requests")
print(sorted(n for n in names if n in sys.modules))
print(type(trace.get_tracer_provider()).__name__)
"""


def loaded_after_init_app(tracing: bool) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", CODE.format(tracing=tracing)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_tracing_on_imports_the_exporter_and_sets_no_provider() -> None:
    modules, provider = loaded_after_init_app(True)
    assert modules == "['opentelemetry.exporter.otlp.proto.http.trace_exporter', 'requests']"
    assert provider == "ProxyTracerProvider"


def test_tracing_off_imports_none_of_it() -> None:
    modules, _ = loaded_after_init_app(False)
    assert modules == "[]"
