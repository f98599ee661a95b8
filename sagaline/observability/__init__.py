"""Observability: Prometheus metrics, health probes (and their worker bootsteps)."""
