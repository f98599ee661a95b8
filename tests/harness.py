"""Process harness for integration and chaos tests: one import for every test helper.

Everything here starts *real* processes (redis-server, a private PostgreSQL
cluster, RabbitMQ, and Celery workers through `sagaline.testing`) and always
cleans them up by pid / process group, never by name. Every wait is bounded in
both iterations and wall time. The servers live in tests/private_*.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sagaline import testing
from sagaline.testing import HarnessError, free_port, pid_alive, pids_in_group, wait_until
from tests.private_postgres import (
    SHARED_PG_HOST,
    SHARED_PG_PORT,
    SHARED_PG_USER,
    PrivatePostgres,
    drop_database,
    find_pg_bin,
    shared_postgres_url,
)
from tests.private_rabbitmq import (
    SHARED_AMQP_URL,
    PrivateRabbitMQ,
    _rabbitmqctl,
    find_rabbitmq_bin,
    rabbitmq_queue_types,
    rabbitmq_vhost,
)
from tests.private_redis import PrivateRedis, find_redis_server

# The name the harness's own tests know it by.
_pids_in_group = pids_in_group

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "REPO_ROOT",
    "SHARED_AMQP_URL",
    "SHARED_PG_HOST",
    "SHARED_PG_PORT",
    "SHARED_PG_USER",
    "HarnessError",
    "PrivatePostgres",
    "PrivateRabbitMQ",
    "PrivateRedis",
    "WorkerProcess",
    "drop_database",
    "find_pg_bin",
    "find_rabbitmq_bin",
    "find_redis_server",
    "free_port",
    "pid_alive",
    "rabbitmq_queue_types",
    "rabbitmq_vhost",
    "shared_postgres_url",
    "wait_until",
    # for the harness's own tests
    "_pids_in_group",
    "_rabbitmqctl",
]


class WorkerProcess(testing.WorkerProcess):
    """sagaline's launcher (`sagaline.testing`), run from the repository's root by
    default so that the ``tests.*``, ``bench`` and ``examples`` app modules import."""

    def __init__(self, app_module: str, *, cwd: Path | str = REPO_ROOT, **options: Any) -> None:
        super().__init__(app_module, cwd=cwd, **options)
