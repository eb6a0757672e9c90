"""Every nnU-Net internal MRAnnotator relies on still exists and behaves in the installed nnunetv2.

An nnunetv2 upgrade that renames, removes or changes one of them must fail here with the name, not change
labels silently elsewhere. The last tests take one internal away (monkeypatch) and show that the check fails
with a message naming it.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest
import torch

from mrannotator import nnunet_adapter as nnunet
from mrannotator import nnunet_training as nnunet_train
from mrannotator.weights import find_model_folders

PREDICTOR = "nnunetv2.inference.predict_from_raw_data:nnUNetPredictor"


@pytest.fixture(scope="module")
def abdomen_model(demo_weights):
    return next(m for m in find_model_folders(demo_weights) if m.dataset == "Dataset001_Abdomen")


@pytest.fixture(scope="module")
def predictor(abdomen_model):
    return nnunet.load_predictor(abdomen_model.path, abdomen_model.checkpoint.name, torch.device("cpu"), 0.5)


def test_installed_nnunetv2_is_the_supported_release():
    assert version("nnunetv2") == nnunet.SUPPORTED_NNUNET == nnunet.installed_version()


def test_every_listed_internal_exists_with_its_signature_and_code():
    assert nnunet.check_internals() == []
    nnunet.require_compatible()  # does not raise


def test_sliding_window_hooks_behave_as_the_engine_expects(predictor):
    patch = tuple(predictor.configuration_manager.patch_size)
    size = tuple(int(p * 1.5) for p in patch)
    slicers = predictor._internal_get_sliding_window_slicers(size)
    # tuples (all channels, one slice per spatial axis) of patch size, covering the image
    assert len(slicers) == 8 and all(len(s) == 4 and s[0] == slice(None) for s in slicers)
    assert all(c.stop - c.start == p for s in slicers for c, p in zip(s[1:], patch, strict=True))
    assert [max(s[ax].stop for s in slicers) for ax in (1, 2, 3)] == list(size)
    x = torch.zeros((1, 1, *patch))
    y = predictor._internal_maybe_mirror_and_predict(x)
    assert y.shape == (1, len(predictor.label_manager.all_labels), *patch)
    # the per-call hooks are looked up on the instance: a wrapped one is called, then nnU-Net's comes back
    spacing = tuple(predictor.configuration_manager.spacing)[::-1]  # x-y-z: no resampling
    data, props = nnunet.preprocess(predictor, np.zeros(size[::-1], np.float32), spacing)
    assert data.shape[1:] == size
    calls = []

    def counting(predict):
        return lambda t: calls.append(t.shape) or predict(t)

    logits = nnunet.predict_logits(predictor, data, select_tiles=lambda s: s[:2], wrap_predict=counting)
    assert len(calls) == 2 and logits.shape[1:] == data.shape[1:]
    assert "_internal_maybe_mirror_and_predict" not in vars(predictor)
    labels, probs = nnunet.logits_to_labels(predictor, logits, props, with_probs=True)
    assert labels.shape == size[::-1] and probs.shape == (logits.shape[0], *size[::-1])


def test_network_has_the_first_conv_and_heads_fast_mode_keeps_in_fp32(abdomen_model):
    pred = nnunet.load_predictor(abdomen_model.path, abdomen_model.checkpoint.name, torch.device("cpu"), 0.5)
    heads = pred.network.decoder.seg_layers
    assert len(heads) >= 1 and all(isinstance(h, torch.nn.Conv3d) for h in heads)
    assert nnunet.keep_edges_fp32(pred.network) == 1 + len(heads)
    assert nnunet.keep_edges_fp32(pred.network) == 0  # idempotent
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = heads[-1](torch.zeros((1, heads[-1].in_channels, 4, 4, 4), dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_slim_checkpoint_loads_in_the_predictor(abdomen_model, predictor, tmp_path):
    import shutil

    ckpt = torch.load(abdomen_model.checkpoint, map_location="cpu", weights_only=False)
    folder = tmp_path / abdomen_model.dataset / abdomen_model.path.name
    (folder / "fold_0").mkdir(parents=True)
    for f in ("dataset.json", "plans.json"):
        shutil.copy(abdomen_model.path / f, folder / f)
    slim = nnunet_train.slim_checkpoint(ckpt["network_weights"], 0, 1, {"note": "test"})
    torch.save(slim, folder / "fold_0" / "checkpoint_final.pth")
    loaded = nnunet.load_predictor(folder, "checkpoint_final.pth", torch.device("cpu"), 0.5)
    assert loaded.trainer_name == nnunet.NO_MIRRORING_TRAINER and loaded.allowed_mirroring_axes is None
    for k, v in predictor.list_of_parameters[0].items():
        assert torch.equal(loaded.list_of_parameters[0][k], v)


def test_trainer_internals_fine_tuning_relies_on():
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    logger = LocalLogger()
    for key in ("train_losses", "val_losses", "dice_per_class_or_region"):
        logger.log(key, 0.5 if key != "dice_per_class_or_region" else [0.5, float("nan")], 0)
    row = nnunet_train.epoch_report(type("T", (), {"logger": logger, "current_epoch": 0})())
    assert row == {"epoch": 1, "train_loss": 0.5, "val_loss": 0.5, "val_dice_per_class": [0.5, None],
                   "val_mean_dice": 0.5}
    assert nnunet_train.trainer_plans({"a": 1}) == {"a": 1, "continue_training": False}
    net = torch.nn.Linear(2, 2)
    assert nnunet_train.bare_network(torch.compile(net)) is net and nnunet_train.bare_network(net) is net
    cls = nnunet_train.short_schedule_trainer(epochs=2, iterations=3, val_iterations=1, learning_rate=1e-3)
    assert cls.__mro__[1].__name__ == nnunet.NO_MIRRORING_TRAINER


# ------------------------------------------------------------------ an upgrade that changes them fails clearly
def test_a_removed_internal_fails_the_check_naming_it(monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.delattr(nnUNetPredictor, "_internal_get_sliding_window_slicers")
    problems = nnunet.check_internals()
    assert problems and f"{PREDICTOR}._internal_get_sliding_window_slicers is missing" in problems[0]
    assert "region skipping selects sliding-window tiles" in problems[0]
    # ... and nothing builds a predictor on such a release
    monkeypatch.setattr(nnunet, "require_compatible", nnunet.require_compatible.__wrapped__)
    with pytest.raises(nnunet.NnUNetIncompatible, match=r"_internal_get_sliding_window_slicers is missing.*"
                       r"Install nnunetv2==2\.8\.1"):
        nnunet.load_predictor("unused", "checkpoint_final.pth", torch.device("cpu"), 0.5)


def test_a_changed_signature_or_logger_key_fails_the_check(monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    monkeypatch.setattr(nnUNetPredictor, "_internal_maybe_mirror_and_predict", lambda self, image: image)

    def init(self, verbose=False):  # one key renamed
        self.my_fantastic_logging = {"dice_per_class_or_region": [], "train_loss": [], "val_losses": []}
        self.verbose = verbose

    monkeypatch.setattr(LocalLogger, "__init__", init)
    problems = "\n".join(nnunet.check_internals())
    assert "_internal_maybe_mirror_and_predict now takes (self, image), expected (self, x)" in problems
    assert "LocalLogger.__init__ no longer uses train_losses" in problems


def test_another_nnunetv2_release_is_named_at_import(monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setattr(nnunet, "installed_version", lambda: "2.9.0")
    with pytest.warns(UserWarning, match=r"nnunetv2 2\.9\.0 is installed, MRAnnotator supports 2\.8\.1 only; every "
                                         r"internal it relies on is still present"):
        nnunet._warn_if_unsupported_version()
    monkeypatch.delattr(nnUNetPredictor, "_internal_maybe_mirror_and_predict")
    with pytest.warns(UserWarning, match=r"2\.9\.0 is installed.*_internal_maybe_mirror_and_predict is missing"):
        nnunet._warn_if_unsupported_version()
