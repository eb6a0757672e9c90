"""Memory estimate of one segmentation request, and the budget it must fit, checked before any inference.

The voxel caps (``limits``) bound what is read, not what inference needs: that grows with the voxels,
the models' resolution, patch size and classes. :func:`estimate` adds up the working memory of a request
beyond the loaded models, from the image's shape and spacing and each model's nnU-Net plans:

- input grid (N voxels): the image as read, its reoriented and preprocessed copies (float32, float64
  while nnU-Net resamples), one class channel resampled back (float64 + float32), the running argmax,
  the model's labels and own-class probability, the merged labels: ``PER_INPUT_VOXEL`` bytes a voxel
  (measured, ``bench/memory.py``; models run one after another, so this does not grow with their number);
- model grid (the image at the model's spacing): preprocessed data, padded copy, logits and nnU-Net's
  sliding-window sums, C + 2 float32 values a voxel, for the model that needs most;
- network activations: a patch through the first stage's features (``ACTIVATION_COPIES`` tensors);
- probabilities asked for (uncertainty): the stock route's C float32 maps three times over for the
  largest model, plus every returned structure map.

Budget: ``MRANNOTATOR_MEMORY_BUDGET_GB`` (default: half the memory of the machine or of the container's
cgroup, whichever is less). A request over it raises :class:`MemoryBudgetError` (HTTP 413, CLI exit 2)
naming the estimate and the budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .limits import TooLargeError

GB = 1e9
PER_INPUT_VOXEL = 80  # bytes; see the module doc and bench/memory.py
ACTIVATION_COPIES = 16
BUDGET_ENV = "MRANNOTATOR_MEMORY_BUDGET_GB"


def gb(n: float) -> str:
    return f"{n / GB:.3g} GB"


class MemoryBudgetError(TooLargeError):
    """The request's estimated memory is over the configured budget (HTTP 413, CLI exit code 2)."""


@dataclass(frozen=True)
class ModelProfile:
    """What the estimate needs of one nnU-Net model (from its plans)."""

    name: str
    classes: int  # segmentation heads, background included
    spacing: tuple[float, ...]  # the model's spacing, x-y-z (image axes after its transpose)
    patch_voxels: int
    first_features: int


def profile(name: str, predictor) -> ModelProfile:
    """The profile of a loaded ``nnUNetPredictor``."""
    cm = predictor.configuration_manager
    arch = cm.network_arch_init_kwargs or {}
    feats = arch.get("features_per_stage") or [32]
    return ModelProfile(name=name, classes=int(predictor.label_manager.num_segmentation_heads),
                        spacing=tuple(float(s) for s in cm.spacing), patch_voxels=math.prod(cm.patch_size),
                        first_features=int(feats[0]))


@dataclass(frozen=True)
class Estimate:
    total: int  # bytes
    parts: dict[str, int]

    def describe(self) -> str:
        return f"{gb(self.total)} (" + ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items()) + ")"


def estimate(shape: Iterable[int], spacing: Iterable[float], models: list[ModelProfile],
             probabilities: bool = False) -> Estimate:
    """Working memory of segmenting an image of ``shape`` (voxels) and ``spacing`` (mm) with ``models``."""
    shape = [int(n) for n in shape][:3]
    spacing = [abs(float(s)) for s in spacing][:3]
    n = math.prod(shape)
    physical = math.prod(a * b for a, b in zip(shape, spacing, strict=True))
    parts = {"input grid": n * PER_INPUT_VOXEL}
    model_grid = activations = 0
    for m in models:
        # the model's spacing is in nnU-Net's axis order; its volume per voxel does not depend on the order
        n_model = physical / math.prod(m.spacing) if len(m.spacing) == 3 else n
        model_grid = max(model_grid, int(n_model * 4 * (m.classes + 2) * 1.5))
        activations = max(activations, m.patch_voxels * m.first_features * 4 * ACTIVATION_COPIES)
    parts["model grid"] = model_grid
    parts["network"] = activations
    if probabilities and models:
        parts["probabilities"] = n * 4 * (3 * max(m.classes for m in models) + sum(m.classes - 1 for m in models))
    return Estimate(total=sum(parts.values()), parts=parts)


def _machine_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def budget_bytes() -> int:
    """The configured budget in bytes (``MRANNOTATOR_MEMORY_BUDGET_GB``, default half the machine's memory)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return _machine_bytes() // 2
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a number of gigabytes") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{BUDGET_ENV}={raw!r}: must be a positive number of gigabytes")
    return int(value * GB)


def check(shape, spacing, models: list[ModelProfile], probabilities: bool = False, what: str = "the image",
          budget: int | None = None) -> Estimate:
    """Raise :class:`MemoryBudgetError` if the estimate is over the budget; else return the estimate."""
    est = estimate(shape, spacing, models, probabilities)
    budget = budget_bytes() if budget is None else budget
    if est.total > budget:
        dims = "x".join(str(int(s)) for s in list(shape)[:3])
        raise MemoryBudgetError(
            f"segmenting {what} ({dims} voxels) with {len(models)} model(s) "
            f"({', '.join(m.name for m in models)}) needs an estimated {est.describe()}; the memory budget is "
            f"{gb(budget)} ({BUDGET_ENV}). Segment fewer regions, a smaller or coarser image, "
            "or raise the budget on a machine with more memory")
    return est
