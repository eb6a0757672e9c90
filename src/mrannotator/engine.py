"""The segmentation engine: nnU-Net v2 region models, loaded once, merged into one catalogue label space.

    from mrannotator import Segmenter
    seg = Segmenter()                      # installed official weights, else the demo weights
    result = seg.segment("mr.nii.gz")      # or a DICOM folder, a nibabel or a SimpleITK image
    result.labels                          # uint8 catalogue ids, on the input's exact grid
    result.summary()                       # structures found, voxel counts, volumes, weights used

Data flow: image + geometry -> lossless reorientation to the model's orientation (LAS for the
MRAnnotator release) -> ``nnUNetPredictor`` on arrays, in-process -> labels mapped to catalogue ids
-> merged over models -> restored to the input orientation. Intensities are handed to nnU-Net as
read (never rescaled or cast to a narrower type; nnU-Net itself computes in float32, as stock).

Overlap rule: where two region models both label a voxel as foreground, the voxel takes the label of
the model whose softmax probability for its own class is higher there; on an exact tie the model
with the lower dataset id wins. Voxels claimed by one model only keep that model's label.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from . import lowmem_export, memory
from . import nnunet_adapter as nnunet
from .catalogue import FIRST_UNCATALOGUED_ID, LabelCatalogue, Structure, expand_regions, load_catalogue
from .errors import InputError, WeightsError
from .imageio import load_image
from .orientation import reorient_to, voxel_spacing
from .performance import network_allocation, precision, tune_allocator
from .weights import ModelFolder, Weights, load_weights


def pick_device(device: str = "auto"):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA GPU is available here (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


@dataclass
class RegionModel:
    """One loaded nnU-Net model and the catalogue entry of each of its labels."""

    folder: ModelFolder
    predictor: object  # nnUNetPredictor
    structures: dict[int, Structure]  # model label value -> catalogue structure

    @property
    def dataset(self) -> str:
        return self.folder.dataset

    def lut(self) -> np.ndarray:
        lut = np.zeros(max(self.structures) + 1 if self.structures else 1, np.uint8)
        for v, s in self.structures.items():
            lut[v] = s.id
        return lut


@dataclass
class Segmentation:
    labels: nib.Nifti1Image  # uint8 catalogue ids on the input grid
    structures: list[Structure]  # catalogue entries of the labels present
    weights: dict
    models_run: list[str]
    mode: str = "exact"
    probabilities: dict[int, np.ndarray] | None = None  # catalogue id -> float32 map on the input grid
    overlaps: int = 0  # voxels claimed by more than one model
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Structures found (id, name, voxel count, volume in ml) and the weights that made them."""
        data = np.asanyarray(self.labels.dataobj)
        counts = np.bincount(data.ravel(), minlength=256)
        voxel_ml = float(abs(np.linalg.det(self.labels.affine[:3, :3]))) / 1000.0
        rows = []
        for s in self.structures:
            n = int(counts[s.id])
            rows.append({**s.as_dict(), "voxels": n, "volume_ml": round(n * voxel_ml, 3)})
        return {
            "structures": rows,
            "weights": self.weights,
            "models_run": self.models_run,
            "mode": self.mode,
            "overlap_voxels": self.overlaps,
            "shape": list(data.shape),
            "seconds": round(self.seconds, 2),
            **self.extra,
        }


class Segmenter:
    """Loads region models once and segments any number of images with them."""

    def __init__(
        self,
        weights: Weights | str | os.PathLike | None = None,
        device: str = "auto",
        threads: int | None = None,
        tile_step_size: float = 0.5,
        regions: Iterable[str] | None = None,
        catalogue: LabelCatalogue | None = None,
        mode: str = "exact",
        skip_absent_regions: bool = False,
    ):
        import torch

        tune_allocator()  # exact: only keeps freed activation buffers in the process (see performance.py)
        self.catalogue = catalogue or load_catalogue()
        self.weights = weights if isinstance(weights, Weights) else load_weights(weights)
        self.device = pick_device(device)
        if threads:
            torch.set_num_threads(int(threads))
        self.tile_step_size = float(tile_step_size)
        self.mode, self._autocast = precision(mode, self.device)
        self.skip_absent_regions = bool(skip_absent_regions)
        wanted = expand_regions(regions)
        self.models: list[RegionModel] = []
        next_id = FIRST_UNCATALOGUED_ID
        for mf in self.weights.models:
            if wanted is not None and not (set(mf.regions()) & wanted):
                continue
            structures = {}
            for name, value in sorted(mf.labels.items(), key=lambda kv: kv[1]):
                s = self.catalogue.find(name)
                if s is None:
                    s = self.catalogue.uncatalogued(name, next_id, region=(mf.regions() or ["unknown"])[0])
                    next_id += 1
                structures[value] = s
            self.models.append(RegionModel(mf, self._load_predictor(mf), structures))
        if not self.models:
            raise WeightsError(f"no model in {self.weights.root} covers the regions {sorted(wanted or [])}")

    def _load_predictor(self, mf: ModelFolder):
        pred = nnunet.load_predictor(mf.path, mf.checkpoint.name, self.device, self.tile_step_size)
        if self.mode != "exact":
            nnunet.keep_edges_fp32(pred.network)
        return pred

    # ---------------------------------------------------------------- public API
    @property
    def structures(self) -> list[Structure]:
        """Every structure the loaded models can label, in catalogue id order."""
        return sorted({s.id: s for m in self.models for s in m.structures.values()}.values(), key=lambda s: s.id)

    def segment(
        self,
        image,
        regions: Iterable[str] | None = None,
        structures: Iterable[str] | None = None,
        probabilities: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> Segmentation:
        """Segment one image (path, DICOM folder, nibabel or SimpleITK image) with the models of ``regions``.

        ``structures`` keeps only those (catalogue names); ``probabilities`` also returns each structure's
        softmax map on the input grid; ``progress`` receives one line per step.
        """
        t0 = time.perf_counter()
        say = progress or (lambda msg: None)
        img = load_image(image)
        models = self._select(regions, structures)
        keep = self._structure_filter(structures)
        memory.check(img.shape, voxel_spacing(img.affine), [memory.profile(m.dataset, m.predictor) for m in models],
                     probabilities)  # before any work: over the budget -> MemoryBudgetError (HTTP 413, exit 2)
        data = np.asanyarray(img.dataobj)
        merged = best = None
        overlaps, skipped = 0, []
        probs_out: dict[int, np.ndarray] | None = {} if probabilities else None
        # one model at a time, reduced to labels (+ own-class probability for the merge) before the next
        output = "probabilities" if probabilities else ("confidence" if len(models) > 1 else "labels")
        for m in models:
            arr, aff, reo = reorient_to(data, img.affine, tuple(m.folder.orientation))
            out = self._predict(m, arr, aff, output, self.skip_absent_regions and len(models) > 1, say)
            del arr
            if out is None:
                skipped.append(m.dataset)
                continue
            ids, conf = self._to_input_grid(m, *out, reo, keep, probs_out)
            del out
            if merged is None:
                merged, best = ids, conf
            else:
                overlaps += _claim(merged, best, ids, conf)
        # no result: every model's presence check came back empty
        merged = np.zeros(data.shape, np.uint8) if merged is None else merged.astype(np.uint8, copy=False)
        present = set(np.unique(merged).tolist()) - {0}
        by_id = {s.id: s for m in models for s in m.structures.values()}
        return Segmentation(
            labels=_label_image(merged, img.affine, f"MRAnnotator {self.weights.source} weights"),
            structures=[by_id[i] for i in sorted(present)],
            weights=self.weights.describe(),
            models_run=[m.dataset for m in models if m.dataset not in skipped],
            mode=self.mode,
            probabilities=probs_out,
            overlaps=overlaps,
            seconds=time.perf_counter() - t0,
            extra={"skipped_absent": skipped} if self.skip_absent_regions else {},
        )

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _to_input_grid(m: RegionModel, seg: np.ndarray, conf: np.ndarray | None, probs: np.ndarray | None, reo,
                       keep: set[int] | None, probs_out: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
        """One model's output back on the input grid (exact permutation/flip) as catalogue ids.

        Returns (ids, the probability of each voxel's own label or None); fills ``probs_out`` if given.
        """
        ids = m.lut()[reo.restore(seg)]
        if keep is not None:
            ids[~np.isin(ids, list(keep))] = 0
        if probs_out is not None and probs is not None:
            for v, s in m.structures.items():
                if keep is None or s.id in keep:
                    probs_out[s.id] = reo.restore(probs[v])
        return ids, (None if conf is None else reo.restore(conf))

    def _select(self, regions, structures) -> list[RegionModel]:
        wanted = expand_regions(regions)
        models = [m for m in self.models if wanted is None or set(m.folder.regions()) & wanted]
        keep = self._structure_filter(structures)
        if keep is not None:
            models = [m for m in models if {s.id for s in m.structures.values()} & keep]
        if not models:
            raise InputError(
                f"no loaded model covers regions={sorted(wanted) if wanted else 'all'} "
                f"structures={sorted(structures) if structures else 'all'}"
            )
        return models

    def _structure_filter(self, structures) -> set[int] | None:
        if not structures:
            return None
        known = {s.name: s for s in self.structures}
        ids = set()
        for name in structures:
            s = self.catalogue.find(name) or known.get(name)
            if s is None or s.id not in {x.id for x in self.structures}:
                raise InputError(f"unknown structure {name!r}: the loaded models label "
                                 f"{', '.join(x.name for x in self.structures)}")
            ids.add(s.id)
        return ids

    def _predict(self, m: RegionModel, arr: np.ndarray, affine: np.ndarray, output: str,
                 presence_check: bool = False, say: Callable[[str], None] = lambda msg: None):
        """nnU-Net on a volume in the model's orientation: (labels as model values, own-class probability or None,
        probabilities or None), as ``lowmem_export.convert`` gives them for ``output``.

        The steps of ``nnUNetPredictor.predict_single_npy_array``, in the same order with the same
        functions, so labels equal stock nnU-Net's; split up so that the preprocessed volume can serve a
        presence check first. Returns None when that check finds none of the model's structures.
        """
        import torch

        data, props = self._preprocess(m, arr, affine)
        data = torch.from_numpy(data)
        logits = tiles = None
        if presence_check:
            tiles = _TileOutputs()
            found, logits = self._presence_pass(m, data, tiles)
            if not found:
                say(f"{m.dataset}: none of its structures found by the coarse pass, skipped")
                return None
        if logits is None:
            say(f"{m.dataset}: predicting ({len(m.structures)} structures, {self.mode}"
                + (f"; {len(tiles.items)} tiles from the coarse pass" if tiles and tiles.items else "") + ")")
            logits = self._logits(m, data, wrap_predict=tiles.replaying if tiles else None)
        del data
        return lowmem_export.convert(m.predictor, logits, props, output)

    @staticmethod
    def _preprocess(m: RegionModel, arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict]:
        """nnU-Net's own preprocessing of a volume already in the model's orientation: (data, properties)."""
        return nnunet.preprocess(m.predictor, arr, voxel_spacing(affine))

    def _logits(self, m: RegionModel, data, select_tiles=None, wrap_predict=None):
        """nnU-Net's sliding window (see ``nnunet_adapter.predict_logits``) in this engine's precision."""
        with self._autocast, nnunet.reproducible_cudnn(self.mode == "exact" and self.device.type == "cuda"), \
                network_allocation():
            return nnunet.predict_logits(m.predictor, data, select_tiles, wrap_predict)

    def _presence_pass(self, m: RegionModel, data, tiles: _TileOutputs):
        """Cheap presence check: the fewest of the real pass's own tiles that cover the image, at full resolution.

        Returns (found, logits): found is False if no voxel gets a foreground class; logits are those of the
        real pass when the check needed all its tiles (any image within about one patch per axis), else None.
        The network outputs of the check's tiles are kept in ``tiles`` and reused by the real pass, so a model
        that is not skipped costs no extra network work. The network sees what it was trained on
        (full-resolution, patch-sized tiles): a half-resolution pass was tried first and measured unsafe (the
        prostate model missed a whole prostate at half resolution).
        """
        used = {}

        def covering(slicers):
            keep = _covering_tiles(slicers)
            used["all"] = len(keep) == len(slicers)
            return keep

        logits = self._logits(m, data, select_tiles=covering, wrap_predict=tiles.recording)
        found = bool((logits.argmax(0) > 0).any())
        if not found or used["all"]:
            tiles.items.clear()  # no real pass follows that could use them
        if not found:
            return False, None
        return True, (logits if used["all"] else None)


def _claim(merged: np.ndarray, best: np.ndarray, ids: np.ndarray, conf: np.ndarray) -> int:
    """One more model's labels into the merged map, in place (overlap rule: see the module doc).

    Returns the number of voxels both had claimed as foreground.
    """
    fg = ids > 0
    overlaps = int((fg & (merged > 0)).sum())
    take = fg & ((merged == 0) | (conf > best))
    merged[take] = ids[take]
    best[take] = conf[take]
    return overlaps


def _label_image(labels: np.ndarray, affine: np.ndarray, description: str) -> nib.Nifti1Image:
    out = nib.Nifti1Image(labels, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    out.header["descrip"] = description.encode()[:79]
    return out


def _covering_tiles(slicers: list[tuple]) -> list[tuple]:
    """The fewest of nnU-Net's sliding-window tiles that still cover every voxel.

    Along each axis, the greedy cover of the tile starts (from the first start, each time the furthest start
    that leaves no gap); a tile is kept if its start on every axis is in that axis's cover. A 2D model's
    slice index (an int, not a slice) keeps every value.
    """
    def start(c):
        return c.start if isinstance(c, slice) else None

    chosen = []
    for ax in range(1, len(slicers[0])):
        cuts = [s[ax] for s in slicers]
        if not isinstance(cuts[0], slice):
            chosen.append(None)
            continue
        starts = sorted({c.start for c in cuts})
        size = cuts[0].stop - cuts[0].start
        end = max(c.stop for c in cuts)
        keep = [starts[0]]
        while keep[-1] + size < end:
            keep.append(max(x for x in starts if x <= keep[-1] + size))
        chosen.append(set(keep))
    return [s for s in slicers
            if all(ok is None or start(c) in ok for ok, c in zip(chosen, s[1:], strict=True))]


class _TileOutputs:
    """Network outputs of sliding-window tiles, kept by the presence pass and given back to the real pass.

    Matched by input: the same tile of the same preprocessed image through the same network gives the same
    output, so the real pass sums exactly what it would have computed itself (labels identical to no check).
    """

    def __init__(self):
        self.items: list[tuple] = []  # (tile input, network output)

    def recording(self, predict):
        def run(x):
            y = predict(x)
            self.items.append((x, y.clone()))  # nnU-Net scales the returned output in place
            return y

        return run

    def replaying(self, predict):
        import torch

        def run(x):
            for i, (seen, _) in enumerate(self.items):
                if seen.shape == x.shape and torch.equal(seen, x):
                    return self.items.pop(i)[1]
            return predict(x)

        return run


def segment(image, **kwargs) -> Segmentation:
    """One-shot convenience: load the default weights and segment one image."""
    init = {k: kwargs.pop(k) for k in ("weights", "device", "threads", "tile_step_size") if k in kwargs}
    return Segmenter(**init).segment(image, **kwargs)
