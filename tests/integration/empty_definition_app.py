"""A Celery app whose module defines a saga that never gets a step: a worker refuses to start."""

from __future__ import annotations

import os

from celery import Celery

import sagaline
from sagaline import Saga

app = Celery("empty_definition_app", broker=os.environ.get("CELERY_BROKER_URL") or None)
sagaline.init_app(app)

never_finished = Saga("hostile_empty")
