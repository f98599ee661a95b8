"""Observability: traces, JSON logs, Prometheus metrics and health probes of sagas."""
