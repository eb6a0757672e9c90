"""Scanner and PACS quirks (issue 22, reading): one reader, the same result in the CLI, the MAP and batch.

Each quirk is a real DICOM series written on disk: orientation strings jittered by 1e-8 (a GE 3D T1's),
MONOCHROME1, a colour image, the first or the last slice missing (seen only by InstanceNumber /
ImagesInAcquisition), several echoes / b-values / time points in one series, a duplicated slice, a
Siemens MOSAIC, a DICOMDIR given as the input. The reader is tested here without a model; then the CLI
and the MAP run as real processes and the batch path (planning + worker read) in-process, on the demo
abdomen model: the same labels where they segment, the same message where they refuse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_fixtures import write_series

from mrannotator.dicom import find_series, load_series, make_seg, read_dicom
from mrannotator.errors import InputError
from mrannotator.phantoms import make_phantom

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
HOLOSCAN_VARS = ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH")
LABELS_FILE, SEG_FILE = "mrannotator_labels.nii.gz", "mrannotator_seg.dcm"
SIEMENS = "SIEMENS MR HEADER"


def phantom(orientation: str = "axial"):
    return make_phantom("abdomen", seed=7, orientation=orientation)


def image_of(orientation: str = "axial") -> nib.Nifti1Image:
    return phantom(orientation).image


def scaled(image: nib.Nifti1Image, num: int, den: int = 1) -> nib.Nifti1Image:
    """The same anatomy at another signal level (another echo, b-value or time point)."""
    data = np.asanyarray(image.dataobj).astype(np.int64) * num // den
    return nib.Nifti1Image(data.astype(np.int16), image.affine)


def voxels(img: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(img.dataobj)


def same_in_space(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """``a`` and ``b`` hold the same value at every physical position (voxel axes may be permuted / flipped)."""
    tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(a.affine),
                                         nib.orientations.io_orientation(b.affine))
    moved = nib.orientations.apply_orientation(voxels(a), tr)
    moved_affine = a.affine @ nib.orientations.inv_ornt_aff(tr, a.shape)
    return bool(np.array_equal(moved, voxels(b)) and np.allclose(moved_affine, b.affine, atol=1e-4))


def edit_files(files, change) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f)


def multi_stack(folder: Path, stacks: list[tuple[dict, nib.Nifti1Image]], per_stack_numbers: bool = False):
    """One series holding several 3D stacks, each with its headers (EchoTime, DiffusionBValue, ...)."""
    uids = {k: pydicom.uid.generate_uid() for k in ("study_instance_uid", "series_instance_uid",
                                                    "frame_of_reference_uid")}
    written = []
    for n, (headers, image) in enumerate(stacks):
        first = 1 if per_stack_numbers else 1 + n * image.shape[2]
        written.append(write_series(image, folder, prefix=f"stack{n}", headers=headers, first_instance_number=first,
                                    series_description="multi-stack", **uids))
    return written


def siemens_private(offset: int, vr: str, value):
    def change(ds):
        ds.private_block(0x0019, SIEMENS, create=True).add_new(offset, vr, value)
    return change


def make_dicomdir(files: list[Path], folder: Path) -> Path:
    """A DICOM media export (pydicom's FileSet): PT000000/ST000000/SE000000/IM... and a DICOMDIR."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in files:
        fs.add(f)
    fs.write(folder)
    return folder / "DICOMDIR"


def reason_of(folder, **kwargs) -> str:
    scan = find_series(folder, **kwargs)
    assert not scan.series, scan.notes()
    return scan.rejected[0].reason


# ------------------------------------------------------------------ the reader alone (no model)
def test_orientation_jitter_is_read_once_and_the_seg_written_from_the_normalised_geometry(tmp_path, monkeypatch):
    """A GE 3D T1's orientation strings differ by up to 6.5e-8: the reader accepted them, highdicom compared
    them exactly and refused the SEG after inference. 1e-8 of jitter reproduces it."""
    from mrannotator.catalogue import load_catalogue
    from mrannotator.dicom import labels_from_seg
    from mrannotator.dicom import seg as seg_module

    ph = phantom("oblique")
    write_series(ph.image, tmp_path, iop_jitter=1e-8)
    scan = find_series(tmp_path)
    series = scan.series[0]
    strings = {tuple(str(v) for v in ds.ImageOrientationPatient) for ds in series.datasets}
    assert len(strings) == 3  # the quirk is really on disk
    volume = load_series(series)
    labels = nib.Nifti1Image(voxels(ph.labels), volume.affine)  # the oblique phantom is stored as acquired
    write = {"weights": {"source": "test"}, "source_affine": series.affine}
    with monkeypatch.context() as m:  # the headers as they are, as before: highdicom compares them exactly
        m.setattr(seg_module, "normalised_sources", lambda datasets, affine: datasets)
        with pytest.raises(ValueError, match="Source images must have a shared orientation"):
            make_seg(labels, load_catalogue().structures, series.datasets, **write)
    seg = make_seg(labels, load_catalogue().structures, series.datasets, **write)
    assert [str(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
            .ImageOrientationPatient] != [str(v) for v in series.datasets[0].ImageOrientationPatient]
    back = labels_from_seg(seg, series.datasets)
    assert np.array_equal(voxels(back), voxels(labels))
    assert strings == {tuple(str(v) for v in ds.ImageOrientationPatient) for ds in series.datasets}  # untouched


def test_monochrome1_is_inverted_to_the_mr_convention(tmp_path):
    image = image_of()
    m2 = write_series(image, tmp_path / "m2")
    m1 = write_series(image, tmp_path / "m1", photometric="MONOCHROME1")
    assert not np.array_equal(pydicom.dcmread(m1[3]).pixel_array, pydicom.dcmread(m2[3]).pixel_array)
    assert np.array_equal(voxels(read_dicom(tmp_path / "m1")), voxels(read_dicom(tmp_path / "m2")))


@pytest.mark.parametrize("kind", ["RGB", "PALETTE COLOR"])
def test_colour_images_are_refused_with_the_reason(tmp_path, kind):
    files = write_series(image_of(), tmp_path)

    def colour(ds):
        ds.PhotometricInterpretation = kind
        ds.SamplesPerPixel = 3 if kind == "RGB" else 1
    edit_files(files, colour)
    assert reason_of(tmp_path).startswith(f"PhotometricInterpretation {kind}: MRAnnotator reads greyscale MR")


@pytest.mark.parametrize("end", ["first", "last"])
def test_a_missing_end_slice_is_refused_by_instance_number_with_an_override(tmp_path, end):
    image = image_of()
    nz = image.shape[2]
    files = write_series(image, tmp_path, headers={"ImagesInAcquisition": nz})
    (files[0] if end == "first" else files[-1]).unlink()
    expected = ("InstanceNumber 1 missing: the first slice(s) are not in the input (instances 2..28 present)"
                if end == "first" else
                "InstanceNumber 28..28 missing: ImagesInAcquisition is 28, the last slice(s) are not in the input")
    reason = reason_of(tmp_path)
    assert reason.startswith(expected) and "--ignore-instance-gaps" in reason
    assert read_dicom(tmp_path, ignore_instance_gaps=True).shape == (*image.shape[:2], nz - 1)


def test_echoes_are_stacks_first_echo_by_default_and_any_by_key(tmp_path):
    image = image_of()
    # written longest echo first: the default is the shortest EchoTime, not the first file
    multi_stack(tmp_path, [({"EchoTime": "20"}, scaled(image, 1, 2)), ({"EchoTime": "10"}, image)])
    series = find_series(tmp_path).series[0]
    assert series.stack == "echo=1" and series.stacks == ("echo=1", "echo=2")
    assert "stack echo=1 (stacks: echo=1, echo=2)" in series.description
    assert same_in_space(load_series(series), image)
    assert same_in_space(read_dicom(tmp_path, stack="echo=2"), scaled(image, 1, 2))
    assert reason_of(tmp_path, stack="echo=3") == "stack echo=3 is not in this series; its stacks: echo=1, echo=2"
    assert reason_of(tmp_path, stack="b=1000").startswith("stack b=1000 is not in this series")
    with pytest.raises(InputError, match="stack 'echo' is not a stack key: write DIM=VALUE"):
        find_series(tmp_path, stack="echo")


def test_diffusion_b_values_are_stacks_b0_by_default_standard_and_siemens_private(tmp_path):
    image = image_of()
    multi_stack(tmp_path / "std", [({"DiffusionBValue": 1000}, scaled(image, 1, 3)), ({"DiffusionBValue": 0}, image)])
    assert find_series(tmp_path / "std").series[0].stacks == ("b=0", "b=1000")
    assert same_in_space(read_dicom(tmp_path / "std"), image)
    assert same_in_space(read_dicom(tmp_path / "std", stack="b=1000"), scaled(image, 1, 3))
    written = multi_stack(tmp_path / "siemens", [({}, image), ({}, scaled(image, 1, 3))])
    for files, b in zip(written, (0, 800), strict=True):
        edit_files(files, siemens_private(0x0C, "IS", b))
    assert find_series(tmp_path / "siemens").series[0].stacks == ("b=0", "b=800")
    assert same_in_space(read_dicom(tmp_path / "siemens", stack="b=800"), scaled(image, 1, 3))


def test_time_points_are_stacks_numbered_per_stack_or_per_series(tmp_path):
    image = image_of()
    for per_stack in (False, True):
        folder = tmp_path / f"per_stack_{per_stack}"
        multi_stack(folder, [({"TemporalPositionIdentifier": t}, scaled(image, t)) for t in (1, 2, 3)],
                    per_stack_numbers=per_stack)
        series = find_series(folder).series[0]
        assert series.stacks == ("time=1", "time=2", "time=3") and series.stack == "time=1"
        assert same_in_space(read_dicom(folder, stack="time=3"), scaled(image, 3))


def test_a_stack_missing_a_slice_names_the_stack_sizes(tmp_path):
    image = image_of()
    written = multi_stack(tmp_path, [({"EchoTime": "10"}, image), ({"EchoTime": "20"}, image)])
    written[1][-1].unlink()  # the last slice of echo 2: echo 1 is complete, but the series is not
    assert reason_of(tmp_path).startswith("the stacks of the series have different slice counts (echo=1: 28, "
                                          "echo=2: 27): slices are missing")


def test_a_duplicated_slice_is_named_as_such(tmp_path):
    files = write_series(image_of(), tmp_path)
    ds = pydicom.dcmread(files[4])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "copy_of_5.dcm")
    reason = reason_of(tmp_path)
    assert reason.startswith("duplicated slice: instances 5 and 5 (") and "remove the copy" in reason
    assert "multi-echo" not in reason


def test_siemens_mosaic_is_refused_naming_mosaic(tmp_path):
    data = voxels(image_of())
    mosaic = nib.Nifti1Image(np.tile(data[:, :, :1], (1, 1, 3)), image_of().affine)  # 3 time points, one "slice"
    files = write_series(mosaic, tmp_path, image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"))
    edit_files(files, siemens_private(0x0A, "US", 16))
    assert reason_of(tmp_path).startswith("Siemens MOSAIC (16 slices tiled in each image): MRAnnotator does not "
                                          "unpack mosaics; convert the series with dcm2niix")


def test_a_dicomdir_given_as_input_is_followed(tmp_path):
    image = image_of()
    files = write_series(image, tmp_path / "export")
    dicomdir = make_dicomdir(files, tmp_path / "media")
    assert np.array_equal(voxels(read_dicom(dicomdir)), voxels(read_dicom(tmp_path / "export")))
    listed = sorted(p for p in (tmp_path / "media").rglob("*") if p.is_file() and p.name != "DICOMDIR")
    listed[0].unlink()
    scan = find_series(dicomdir)
    assert (listed[0], "listed in the DICOMDIR, not found") in scan.skipped
    assert scan.rejected[0].reason.startswith("InstanceNumber 1 missing")
