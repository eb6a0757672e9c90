"""The one label acceptance function (mrannotator.labels), on hand-made 4x5x6 volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mrannotator.errors import InputError
from mrannotator.labels import LabelError, accept_label, check_label_shape

pytestmark = pytest.mark.unit

SHAPE = (4, 5, 6)
AFFINE = np.array([[-1.5, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def _label(data, affine=AFFINE) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(data), affine)


def _data(dtype=np.uint8) -> np.ndarray:
    data = np.zeros(SHAPE, dtype)
    data[1:3, 1:4, 2:5] = 5  # liver
    data[0, 0, 0] = 1  # spleen
    return data


def test_a_good_label_comes_back_as_uint8_on_the_image_affine():
    off = AFFINE.copy()
    off[0, 3] += 0.004  # float32 round-off of an exported label: inside the tolerance
    out = accept_label(_label(_data(np.float32), off), SHAPE, AFFINE, allowed_ids={1, 5})
    assert out.get_data_dtype() == np.uint8 and np.asanyarray(out.dataobj).dtype == np.uint8
    assert np.array_equal(out.affine, AFFINE) and int(out.header["sform_code"]) == 1
    assert np.array_equal(np.asanyarray(out.dataobj), _data())


def test_a_4d_file_with_one_volume_is_a_3d_label():
    out = accept_label(_label(_data()[..., None]), SHAPE, AFFINE)
    assert out.shape == SHAPE


@pytest.mark.parametrize("data, affine, allowed, words", [
    (np.zeros((4, 5, 7), np.uint8), AFFINE, None, "has shape (4, 5, 7); the image has (4, 5, 6)"),
    (np.zeros((4, 5, 6, 2), np.uint8), AFFINE, None, "has shape (4, 5, 6, 2)"),
    (_data(), np.diag([1.5, 1.5, 3.0, 1]), None, "not on the image's grid"),
    (_data(np.int16) * 60, AFFINE, None, "values from 0 to 300"),
    (_data(np.int16) - 2, AFFINE, None, "values from -2 to 3"),
    (_data(), AFFINE, {5}, "values [1] that are not catalogue ids"),
])
def test_a_label_that_cannot_be_used_is_refused_with_the_reason(data, affine, allowed, words):
    with pytest.raises(LabelError) as e:
        accept_label(_label(data, affine), SHAPE, AFFINE, allowed_ids=allowed, what="label for 'x'")
    assert str(e.value).startswith("label for 'x'") and words in str(e.value)


def test_fractional_values_are_refused():
    data = _data(np.float32)
    data[0, 0, 1] = 2.5
    with pytest.raises(InputError, match="fractional"):
        accept_label(_label(data), SHAPE, AFFINE)


def test_the_shape_check_alone_works_on_a_declared_shape():
    check_label_shape((4, 5, 6, 1), SHAPE, "label")
    with pytest.raises(LabelError, match=r"has shape \(6, 5, 4\)"):
        check_label_shape((6, 5, 4), SHAPE, "label")
