"""Observability: traces, logs (and metrics, health probes) of sagas in production."""
