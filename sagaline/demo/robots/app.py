"""The Celery app of the robot fleet: `sagaline worker -A sagaline.demo.robots.app`.

Broker from CELERY_BROKER_URL; without it, sagaline's server-less filesystem
broker in SAGALINE_HOME. State store from SAGALINE_STORE_URL (default: SQLite).
"""

from __future__ import annotations

# The tasks and the saga definition register themselves on import, in every process.
# (They take the app from celery_app.py, so that no module imports this one back.)
from . import sagas  # noqa: F401
from .celery_app import app as app
