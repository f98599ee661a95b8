"""The Redis store's URLs and clients: one server (`redis://`, `rediss://`) or a Redis
Cluster (`redis+cluster://`, `rediss+cluster://`, any node of it), and `buckets=N`,
the store's own query parameter (redis_layout.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..exceptions import ConfigurationError
from .base import redact

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def client_url(url: str) -> tuple[str, bool, int | None]:
    """redis-py's URL for a store URL, whether it names a cluster, and its `buckets`
    (the number of buckets a new store gets; a query parameter redis-py must not see)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in (*CLUSTER_SCHEMES, "redis", "rediss", "unix"):
        raise ConfigurationError(f"not a Redis store URL: {redact(url)!r}")
    cluster = scheme.lower() in CLUSTER_SCHEMES
    plain = f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}" if cluster else url
    parts = urlsplit(plain)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [v for k, v in query if k == "buckets"]
    if not given:
        return plain, cluster, None
    try:
        buckets = int(given[-1])
    except ValueError:
        raise ConfigurationError(
            f"buckets={given[-1]!r} in {redact(url)!r} is not a whole number"
        ) from None
    rest_query = urlencode([(k, v) for k, v in query if k != "buckets"])
    return urlunsplit(parts._replace(query=rest_query)), cluster, buckets


def new_client(url: str, cluster: bool, options: dict[str, Any]) -> Any:
    """A redis-py client for `url` (as client_url returns it), replies decoded."""
    import redis

    if cluster:
        # RedisCluster asks a node for the slot map when it is made: the store makes
        # it on first use, inside the caller's retries.
        return redis.cluster.RedisCluster.from_url(url, decode_responses=True, **options)
    return redis.Redis.from_url(url, decode_responses=True, **options)
