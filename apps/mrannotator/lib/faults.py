"""Fault injection for the crash tests: a process that SIGKILLs itself at a named point.

An environment variable names where: a point name (``start``, ``label:written``, ...), ``NAME@N`` (the
N-th time the process reaches that point) or a number k (the k-th point reached, counting from 1).
Unset: nothing happens. ``passed`` lists the points reached, so a test can learn how many a complete
run has and then kill runs at random ones.

- ``MRANNOTATOR_TRAIN_KILL_AT``: a training run (lib/trainers/finetune.py);
- ``MRANNOTATOR_DATASTORE_KILL_AT``: the server, during label and image saves and index rewrites of
  the local datastore (lib/monailabel_adapter/datastore_internals.py), counted from the end of the
  datastore's start-up.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

logger = logging.getLogger(__name__)

TRAIN_ENV = "MRANNOTATOR_TRAIN_KILL_AT"
DATASTORE_ENV = "MRANNOTATOR_DATASTORE_KILL_AT"


class FaultPoints:
    def __init__(self, kill_at: str | None = None, env: str = TRAIN_ENV, what: str = "training"):
        self.env, self.what = env, what
        self.kill_at = (kill_at if kill_at is not None else os.environ.get(env, "")).strip()
        self.passed: list[str] = []
        self._count: Counter[str] = Counter()

    def point(self, name: str) -> None:
        self.passed.append(name)
        self._count[name] += 1
        if self.kill_at and self.kill_at in (name, str(len(self.passed)), f"{name}@{self._count[name]}"):
            logger.warning(f"{self.env}={self.kill_at}: killing this {self.what} process at {name!r}")
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
