"""Label maps as frames keyed by SOPInstanceUID (lib/frame_labels.py, the OHIF workflow's wire format), the
extension's files served under /viewer/mrannotator/, and the roles of the /annotate routes."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest

from mrannotator.errors import InputError

pytestmark = pytest.mark.unit


def _volume(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = np.zeros((7, 5, 4), np.int32)  # (column, row, slice)
    volume[1:5, 1:4, 1] = rng.integers(0, 3, (4, 3))
    volume[2:6, 0:3, 3] = 5
    return volume


def test_frames_round_trip_to_the_same_voxels_and_skip_empty_slices():
    from lib.frame_labels import frames_from_volume, volume_from_frames

    volume, uids = _volume(), ["1.1", "1.2", "1.3", "1.4"]
    frames = frames_from_volume(volume, uids)
    assert set(frames) == {"1.2", "1.4"}  # slices 0 and 2 are empty
    raw = zlib.decompress(base64.b64decode(frames["1.4"]))
    frame = np.frombuffer(raw, np.uint8).reshape(5, 7)  # rows x columns, the instance's own pixel order
    assert np.array_equal(frame, volume[:, :, 3].T)
    assert np.array_equal(volume_from_frames(frames, uids, rows=5, columns=7), volume)
    # the same frames under another order of the instances land on their own slices, not by position in a list
    assert np.array_equal(volume_from_frames(frames, uids[::-1], 5, 7), volume[:, :, ::-1])


@pytest.mark.parametrize("frames, message", [
    ({"9.9": ""}, "not in this series"),
    ({"1.1": "%%%"}, "not base64 of zlib"),
    ({"1.1": base64.b64encode(b"no zlib").decode()}, "not base64 of zlib"),
    ({"1.1": base64.b64encode(zlib.compress(bytes(34))).decode()}, "has 34 pixels; the instance has 5 x 7 = 35"),
    ({"1.1": 5}, "expected a base64 string"),
    (["1.1"], "must be an object"),
])
def test_bad_frames_are_refused_naming_the_problem(frames, message):
    from lib.frame_labels import volume_from_frames

    with pytest.raises(InputError, match=message):
        volume_from_frames(frames, ["1.1", "1.2"], rows=5, columns=7)


def test_segment_indices_become_label_ids_and_unnamed_ones_are_refused():
    from lib.frame_labels import relabel

    volume = np.array([[[0, 1], [2, 1]]], np.uint8)
    assert relabel(volume, {"1": 5, "2": 23}).tolist() == [[[0, 5], [23, 5]]]
    with pytest.raises(InputError, match=r"segment\(s\) \[2\]"):
        relabel(volume, {"1": 5})


def test_a_label_that_cannot_travel_as_8_bit_frames_is_refused():
    from lib.frame_labels import frames_from_volume

    with pytest.raises(InputError, match="0..255"):
        frames_from_volume(np.full((2, 2, 1), 300), ["1.1"])
    with pytest.raises(InputError, match="series of 2 instances"):
        frames_from_volume(np.zeros((2, 2, 1)), ["1.1", "1.2"])


def test_extension_is_served_and_app_config_hands_it_the_config(tmp_path):
    from lib.monailabel_adapter import ohif_viewer

    assert "mrannotator/mrannotator.js')).configure(config, context)" in ohif_viewer.app_config()
    served = ohif_viewer.viewer_file("mrannotator.js", ohif_viewer.EXTENSION_DIR)
    assert served.name == "mrannotator.js" and "export async function configure" in served.read_text()


def test_annotate_routes_need_the_annotator_role():
    from lib.monailabel_adapter.roles import required_role

    assert required_role("POST", "/annotate/next/random") == "annotator"
    assert required_role("POST", "/annotate/infer") == "annotator"
    assert required_role("PUT", "/annotate/label") == "annotator"
    assert required_role("POST", "/annotate/refine") == "annotator"
    assert required_role("DELETE", "/annotate/label") == "admin"  # unlisted: admin
