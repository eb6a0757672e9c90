"""Every use of nnU-Net v2 beyond its documented entry points, in one place, checked against the installed release.

MRAnnotator drives ``nnUNetPredictor`` and ``nnUNetTrainer`` in-process and, to do so, relies on names and
data layouts that nnU-Net does not promise to keep (private methods, logger keys, the checkpoint schema, a
flag its trainer pops from the plans). They are all used here and listed in :data:`INTERNALS`; the rest of
the package calls the functions of this module only. ``tests/test_nnunet_adapter.py`` checks that each
listed internal still exists and behaves, so that an nnunetv2 upgrade fails one clear test instead of
changing labels silently.

At import the installed nnunetv2 version is compared with :data:`SUPPORTED_NNUNET` (a warning names the
internals that no longer match when it differs); the first predictor or trainer built refuses to run with
:class:`NnUNetIncompatible` if any listed internal is missing or changed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .errors import MRAnnotatorError, WeightsError

SUPPORTED_NNUNET = "2.8.1"  # the release every internal below was read in (pyproject pins it)
_PREDICTOR = "nnunetv2.inference.predict_from_raw_data:nnUNetPredictor"
_TRAINER = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer"
NO_MIRRORING_TRAINER = "nnUNetTrainerNoMirroring"
CONFIGURATION = "3d_fullres"
# the trainer attributes the short fine-tuning schedule sets (a renamed one would be set for nothing)
_SCHEDULE_ATTRIBUTES = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr",
                        "disable_checkpointing")
# the per-epoch values the fine-tuning report reads from nnU-Net's logger
_LOGGER_KEYS = ("train_losses", "val_losses", "dice_per_class_or_region")
# what the predictor reads from a checkpoint (the slim checkpoint of export has exactly these)
_CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes")


class NnUNetIncompatible(MRAnnotatorError):
    """The installed nnunetv2 lacks or changed an internal MRAnnotator relies on."""

    exit_code = 1


@dataclass(frozen=True)
class Internal:
    """One nnU-Net name MRAnnotator relies on: where it is, the parameters it must take, what its code must use."""

    where: str  # "module:Qualified.name"
    why: str
    params: tuple[str, ...] = ()  # leading parameter names, in order
    uses: tuple[str, ...] = ()  # names or string constants its code must still contain


INTERNALS: tuple[Internal, ...] = (
    Internal(f"{_PREDICTOR}._internal_get_sliding_window_slicers", "region skipping selects sliding-window tiles",
             ("self", "image_size")),
    Internal(f"{_PREDICTOR}._internal_maybe_mirror_and_predict", "region skipping keeps and reuses tile outputs",
             ("self", "x"), ("network",)),
    Internal(f"{_PREDICTOR}._internal_predict_sliding_window_return_logits",
             "the two per-call hooks above must still be what the sliding window calls",
             ("self", "data", "slicers"), ("_internal_maybe_mirror_and_predict",)),
    Internal(f"{_PREDICTOR}.predict_sliding_window_return_logits", "the sliding window must still ask for its tiles",
             ("self", "input_image"), ("_internal_get_sliding_window_slicers",
                                        "_internal_predict_sliding_window_return_logits")),
    Internal(f"{_PREDICTOR}.predict_logits_from_preprocessed_data", "the engine runs nnU-Net's own prediction steps",
             ("self", "data"), ("predict_sliding_window_return_logits",)),
    Internal(f"{_PREDICTOR}.predict_single_npy_array",
             "the engine re-sequences these steps (preprocess, logits, resample back) to equal stock labels",
             ("self", "input_image", "image_properties"),
             ("PreprocessAdapterFromNpy", "predict_logits_from_preprocessed_data",
              "convert_predicted_logits_to_segmentation_with_correct_shape")),
    Internal(f"{_PREDICTOR}.__init__", "the predictor turns cuDNN autotuning on; exact mode turns it off",
             ("self", "tile_step_size", "use_gaussian", "use_mirroring", "perform_everything_on_device", "device"),
             ("cudnn", "benchmark")),
    Internal(f"{_PREDICTOR}.initialize_from_trained_model_folder", "fine-tuned checkpoints are written in this schema",
             ("self", "model_training_output_dir", "use_folds", "checkpoint_name"), _CHECKPOINT_KEYS),
    Internal("nnunetv2.preprocessing.preprocessors.default_preprocessor:DefaultPreprocessor.run_case_npy",
             "the engine preprocesses arrays in-process",
             ("self", "data", "seg", "properties", "plans_manager", "configuration_manager", "dataset_json")),
    Internal("nnunetv2.preprocessing.preprocessors.default_preprocessor:DefaultPreprocessor.run_case_save",
             "fine-tuning preprocesses its cases in-process",
             ("self", "output_filename_truncated", "image_files", "seg_file", "plans_manager",
              "configuration_manager", "dataset_json")),
    Internal("nnunetv2.inference.export_prediction:convert_predicted_logits_to_segmentation_with_correct_shape",
             "logits go back to the input grid as stock nnU-Net does",
             ("predicted_logits", "plans_manager", "configuration_manager", "label_manager", "properties_dict",
              "return_probabilities")),
    Internal("nnunetv2.inference.export_prediction:convert_predicted_logits_to_segmentation_with_correct_shape",
             "lowmem_export repeats its steps one class channel at a time (resampling, crop, transpose; softmax "
             "with the default_num_processes threads it sets)",
             (), ("resampling_fn_probabilities", "insert_crop_into_image", "transpose_backward", "set_num_threads",
                  "apply_inference_nonlin", "shape_after_cropping_and_before_resampling", "bbox_used_for_cropping",
                  "shape_before_cropping")),
    Internal("nnunetv2.preprocessing.resampling.default_resampling:resample_data_or_seg",
             "lowmem_export resamples one channel at a time: nnU-Net's resampling must loop over channels",
             ("data", "new_shape", "is_seg", "axis", "order", "do_separate_z"), ("range",)),
    Internal("nnunetv2.configuration:default_num_processes", "the threads of nnU-Net's softmax (lowmem_export)"),
    Internal(f"{_TRAINER}.__init__", "fine-tuning shortens the schedule and passes the plans' continue_training flag",
             ("self", "plans", "configuration", "fold", "dataset_json", "device"),
             ("continue_training", *_SCHEDULE_ATTRIBUTES)),
    Internal(f"{_TRAINER}.on_epoch_end", "the fine-tuning report is taken at the end of each epoch", ("self",)),
    Internal(f"{_TRAINER}.run_training", "fine-tuning runs nnU-Net's own training loop", ("self",)),
    Internal("nnunetv2.training.logging.nnunet_logger:LocalLogger.__init__", "the fine-tuning report reads these keys",
             ("self",), _LOGGER_KEYS),
    Internal("nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring:"
             "nnUNetTrainerNoMirroring", "the trainer of the release and of every fine-tuned checkpoint"),
    Internal("nnunetv2.paths:nnUNet_raw", "fine-tuning points nnU-Net at its own folders through the environment"),
)


# ------------------------------------------------------------------ the check
def _resolve(where: str):
    module, _, qualname = where.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _code_names(func) -> set[str]:
    """Names and string constants of a function's code, nested functions included."""
    code = getattr(inspect.unwrap(func), "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        consts = list(c.co_consts)
        while consts:
            k = consts.pop()
            if isinstance(k, str):
                names.add(k)
            elif isinstance(k, tuple):  # e.g. the keys of a dict literal
                consts.extend(k)
            elif inspect.iscode(k):
                stack.append(k)
    return names


def check_internals() -> list[str]:
    """One line per listed internal that is missing or changed in the installed nnunetv2 (empty: all fine)."""
    problems = []
    for it in INTERNALS:
        try:
            obj = _resolve(it.where)
        except (ImportError, AttributeError) as e:
            problems.append(f"{it.where} is missing ({type(e).__name__}: {e}); needed because {it.why}")
            continue
        if it.params:
            try:
                found = tuple(inspect.signature(obj).parameters)[: len(it.params)]
            except (TypeError, ValueError):
                found = ()
            if found != it.params:
                problems.append(f"{it.where} now takes ({', '.join(found)}), expected ({', '.join(it.params)}); "
                                f"needed because {it.why}")
        missing = [u for u in it.uses if u not in _code_names(obj)]
        if missing:
            problems.append(f"{it.where} no longer uses {', '.join(missing)}; needed because {it.why}")
    return problems


def installed_version() -> str | None:
    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return None


@functools.cache
def require_compatible() -> None:
    """Raise :class:`NnUNetIncompatible` naming every missing or changed internal (checked once per process)."""
    problems = check_internals()
    if problems:
        raise NnUNetIncompatible(
            f"nnunetv2 {installed_version()} is installed; MRAnnotator is written against nnunetv2 {SUPPORTED_NNUNET} "
            f"and cannot run with this one: " + "; ".join(problems)
            + f". Install nnunetv2=={SUPPORTED_NNUNET}.")


def _warn_if_unsupported_version() -> None:
    found = installed_version()
    if found == SUPPORTED_NNUNET:
        return
    problems = check_internals() if found else ["nnunetv2 is not installed"]
    warnings.warn(
        f"nnunetv2 {found} is installed, MRAnnotator supports {SUPPORTED_NNUNET} only; "
        + ("; ".join(problems) if problems else "every internal it relies on is still present, but labels are "
           "only known to equal stock nnU-Net's on the supported release"),
        stacklevel=2)


_warn_if_unsupported_version()


# ------------------------------------------------------------------ prediction
def load_predictor(model_folder: Path, checkpoint_name: str, device, tile_step_size: float):
    """An ``nnUNetPredictor`` for fold 0 of ``model_folder``, configured as stock ``nnUNetv2_predict``."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    require_compatible()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a CPU notice on construction
        pred = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=True,  # as stock; the NoMirroring checkpoints allow no mirror axes anyway
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
    try:
        pred.initialize_from_trained_model_folder(str(model_folder), use_folds=(0,), checkpoint_name=checkpoint_name)
    except (RuntimeError, KeyError, EOFError, OSError, torch.serialization.pickle.UnpicklingError) as e:
        dataset = Path(model_folder).parent.name
        raise WeightsError(f"{dataset}: cannot load {Path(model_folder) / 'fold_0' / checkpoint_name}: "
                           f"{type(e).__name__}: {e}") from e
    return pred


def preprocess(pred, arr: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, dict]:
    """nnU-Net's own preprocessing of one x-y-z volume already in the model's orientation: (data, properties)."""
    # nnU-Net's SimpleITK reader order: (z, y, x) with the spacing reversed; one channel. C-contiguous, as its
    # readers return it: the z-score normalisation sums in memory order, and another layout changed the
    # normalised intensities by ~3e-6 and 11 labels of 4.1 M at near-ties (bench/fullsize.py)
    x = np.ascontiguousarray(arr.transpose(2, 1, 0))[None]
    props = {"spacing": list(spacing)[::-1]}
    pp = pred.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = pp.run_case_npy(x, None, props, pred.plans_manager, pred.configuration_manager, pred.dataset_json)
    return data, props


@contextlib.contextmanager
def reproducible_cudnn(enabled: bool) -> Iterator[None]:
    """cuDNN without autotuning within the block (``nnUNetPredictor`` turns autotuning on for the whole process).

    Autotuning may pick other kernels in another process and change labels at near-ties (6,543 of 4.1 M voxels
    on an H200); exact mode wants them reproducible. The previous flags come back on exit.
    """
    import torch

    if not enabled:
        yield
        return
    old = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old


def predict_logits(pred, data, select_tiles: Callable | None = None, wrap_predict: Callable | None = None):
    """nnU-Net's sliding window on preprocessed data; the logits are returned on the CPU.

    ``select_tiles`` keeps only some of nnU-Net's tiles (a function of its list of tile slicers, each a tuple
    ``(slice(None), slice_x, slice_y, slice_z)``); ``wrap_predict`` wraps its per-tile network call. Both are
    set on this predictor instance for this call only.
    """
    import torch

    patched = {}
    if select_tiles is not None:
        slicers = pred._internal_get_sliding_window_slicers
        patched["_internal_get_sliding_window_slicers"] = lambda size: select_tiles(slicers(size))
    if wrap_predict is not None:
        patched["_internal_maybe_mirror_and_predict"] = wrap_predict(pred._internal_maybe_mirror_and_predict)
    vars(pred).update(patched)
    try:
        return pred.predict_logits_from_preprocessed_data(torch.as_tensor(data)).cpu()
    finally:
        for name in patched:
            delattr(pred, name)  # back to nnU-Net's own methods


def logits_to_labels(pred, logits, props: dict, with_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits back on the input grid as stock nnU-Net does: (labels x-y-z, probabilities c-x-y-z float32 or None)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    out = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pred.plans_manager, pred.configuration_manager, pred.label_manager, props,
        return_probabilities=with_probs,
    )
    if with_probs:
        seg, probs = out
        return seg.transpose(2, 1, 0), probs.transpose(0, 3, 2, 1).astype(np.float32, copy=False)
    return out.transpose(2, 1, 0), None


def keep_edges_fp32(network) -> int:
    """Run the first convolution and the segmentation heads of an nnU-Net network in float32 under autocast.

    These two ends cost little time and much accuracy in reduced precision: the first convolution reads
    the MR intensities themselves (bf16 keeps 8 significant bits of them), the heads make the class scores
    whose argmax is the label. Measured on the demo weights, bf16 on CPU, against exact mode: structures
    below Dice 0.99 went from 12 to 8 of 79 (all 8 on the real MR sample), at about 4% more time.
    Relies on nnU-Net's architectures keeping their heads in ``network.decoder.seg_layers``.
    Returns the number of modules changed.
    """
    import torch

    first = next((m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None)
    heads = list(getattr(getattr(network, "decoder", None), "seg_layers", []))
    changed = 0
    for module in [first, *heads]:
        if module is None or getattr(module, "_mrannotator_fp32", False):
            continue
        inner = module.forward

        def forward(x, *args, _inner=inner, **kwargs):
            with torch.autocast(x.device.type, enabled=False):
                return _inner(x.float(), *args, **kwargs)

        module.forward = forward
        module._mrannotator_fp32 = True
        changed += 1
    return changed
