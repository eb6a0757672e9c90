"""The annotation loop as the paper ran it, short: two rounds of next_sample -> infer -> correct -> save_label
-> train through the real MONAI Label server (MONAILabelClient, as 3D Slicer drives it), on a new site.

The full study (rounds 4, 4, 8, 8; both strategies) is ``bench/annotation_study.py``; this test runs its
own functions with a CI-sized schedule: a T1-like "new site" (``mrannotator.sites``) on which the demo
abdomen model starts poor, two labelled original-contrast cases kept in the datastore (replay), two
held-out phantoms of each contrast uploaded to the server's infer.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1800)

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = [2, 2]
TRAIN_PARAMS = {"max_epochs": 2, "iterations": 8, "val_iterations": 1, "learning_rate": 0.01}


def _study():
    """bench/annotation_study.py as a module (bench/ is not a package)."""
    if "annotation_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("annotation_study", ROOT / "bench" / "annotation_study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["annotation_study"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["annotation_study"]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, demo_weights):
    from monailabel.client import MONAILabelClient

    study = _study()
    root = tmp_path_factory.mktemp("annotation_loop")
    site = study.make_site(root, demo_weights, pool=4, heldout=2, original=2, replay=2)
    server = study.start_study_server(root, site, demo_weights)
    try:
        (root / "client").mkdir()
        client = MONAILabelClient(server.url, tmpdir=str(root / "client"))
        start = study.evaluate(client, site)
        arm = study.run_arm(client, site, "random", SCHEDULE, TRAIN_PARAMS)
        datastore = client.datastore()
        yield {"start": start, "arm": arm, "site": site, "datastore": datastore, "study": study}
    finally:
        study.stop_study_server(server)


def test_two_rounds_lift_new_site_dice_without_forgetting(loop):
    start, rounds = loop["start"], loop["arm"]["rounds"]
    print({"start": (start["new_site_dice"], start["original_dice"]),
           "rounds": [(r["labelled"], r["new_site_dice"], r["original_dice"], r["effort_voxels_per_case"])
                      for r in rounds]})
    assert start["new_site_dice"] < 0.5  # the demo model does not know the new contrast
    assert len(rounds) == 2 and [r["labelled"] for r in rounds] == [2, 4]
    assert rounds[-1]["new_site_dice"] >= start["new_site_dice"] + 0.2
    assert rounds[-1]["original_dice"] >= start["original_dice"] - 0.05


def test_each_round_trains_on_every_label_so_far_and_serves_the_new_model(loop):
    rounds, site = loop["arm"]["rounds"], loop["site"]
    # replay cases + every case labelled so far
    assert [r["training"]["train_cases"] for r in rounds] == [len(site.replay) + 2, len(site.replay) + 4]
    published = [r["training"]["model_version"] for r in rounds]  # the model store's version per training
    assert len(set(published)) == 2 and None not in published
    # checkpoint versions as infer reports them: round 2's proposals came from round 1's hot-reloaded model
    served = [r["heldout"]["model_version"] for r in rounds]  # evaluated right after each training
    proposals = [{c["model_version"] for c in r["cases"]} for r in rounds]
    assert len(set(served)) == 2 and proposals[0].isdisjoint(served)
    assert proposals[1] == {served[0]}
    labelled = {i for i, o in loop["datastore"]["objects"].items() if o["labels"].get("final")}
    picked = {c["id"] for r in rounds for c in r["cases"]}
    assert len(picked) == 4 and picked | {c.name for c in site.replay} == labelled


def test_server_answers_infer_while_training(loop):
    for r in loop["arm"]["rounds"]:
        t = r["training"]
        assert t["infer_failures"] == [], t["infer_failures"]
        assert t["infer_during_training_requests"] >= 1


def test_correction_effort_counts_voxels_and_slices():
    import numpy as np

    study = _study()
    truth = np.zeros((4, 5, 6), np.uint8)
    truth[1:3, 1:3, 2:4] = 5
    pred = truth.copy()
    assert study.correction_effort(truth, pred) == (0, 0)
    pred[0, 0, 0] = 5  # one false voxel on slice 0
    pred[1, 1, 3] = 0  # one missed voxel on slice 3
    assert study.correction_effort(truth, pred) == (2, 2)
    dice = study.dice_per_structure(truth, pred, {5: "liver", 1: "spleen"})
    assert dice["spleen"] == 1.0  # absent in both: nothing to correct
    assert dice["liver"] == pytest.approx(2 * 7 / (8 + 8))


def test_new_site_is_the_same_anatomy_under_another_contrast():
    import numpy as np

    from mrannotator.phantoms import TISSUE, make_phantom
    from mrannotator.sites import make_site_phantom

    original, new = make_phantom("abdomen", seed=3), make_site_phantom("abdomen", seed=3, site="t1")
    np.testing.assert_array_equal(np.asanyarray(original.labels.dataobj), np.asanyarray(new.labels.dataobj))
    np.testing.assert_array_equal(original.image.affine, new.image.affine)
    labels = np.asanyarray(new.labels.dataobj)
    liver, spleen = (labels == 5), (labels == 1)  # catalogue ids of liver and spleen
    img_o, img_n = np.asanyarray(original.image.dataobj), np.asanyarray(new.image.dataobj)
    assert img_o[liver].mean() < img_o[spleen].mean() and img_n[liver].mean() > img_n[spleen].mean()
    with pytest.raises(ValueError, match="unknown site"):
        make_site_phantom("abdomen", site="no_such_site")
    with pytest.raises(ValueError, match="exactly these tissues"):
        make_phantom("abdomen", contrast={k: v for k, v in TISSUE.items() if k != "fat"})
