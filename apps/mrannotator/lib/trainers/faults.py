"""Fault injection for the all-or-nothing publication test: a training run that SIGKILLs itself.

``MRANNOTATOR_TRAIN_KILL_AT`` names where: a point name (``start``, ``Dataset001_Abdomen:epoch1``,
``staged``, ...) or a number k (the k-th point the run reaches, counting from 1). Unset: nothing
happens. The points a run passed are listed in its train stats (``fault_points``), so a test can
learn how many a complete run has and then kill runs at random ones.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

ENV = "MRANNOTATOR_TRAIN_KILL_AT"


class FaultPoints:
    def __init__(self, kill_at: str | None = None):
        self.kill_at = (kill_at if kill_at is not None else os.environ.get(ENV, "")).strip()
        self.passed: list[str] = []

    def point(self, name: str) -> None:
        self.passed.append(name)
        if self.kill_at and self.kill_at in (name, str(len(self.passed))):
            logger.warning(f"{ENV}={self.kill_at}: killing this training process at {name!r}")
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
