"""Fault injection for the all-or-nothing publication test: a training run that SIGKILLs itself.

``MRANNOTATOR_TRAIN_KILL_AT`` names where (lib/faults.py): a point name (``start``,
``Dataset001_Abdomen:epoch1``, ``staged``, ...) or a number k (the k-th point the run reaches,
counting from 1). The points a run passed are listed in its train stats (``fault_points``).
"""

from __future__ import annotations

from lib.faults import TRAIN_ENV as ENV
from lib.faults import FaultPoints

__all__ = ["ENV", "FaultPoints"]
