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

from mrannotator.dicom import find_series, load_series, make_seg, read_dicom
from mrannotator.errors import InputError
from mrannotator.phantoms import make_phantom
from mrannotator.testing.dicom_fixtures import write_series

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
                "InstanceNumber 28 missing: ImagesInAcquisition is 28, the last slice(s) are not in the input")
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


def test_repeated_volumes_no_header_tells_apart_are_stacks_by_instance_number(tmp_path):
    """As GE writes fMRI (no TemporalPositionIdentifier) and the directions of one b-value: the n-th instance
    (by InstanceNumber) at each position is volume n."""
    image = image_of()
    multi_stack(tmp_path / "fmri", [({}, scaled(image, t)) for t in (1, 2, 3)])
    series = find_series(tmp_path / "fmri").series[0]
    assert series.stacks == ("volume=1", "volume=2", "volume=3") and series.stack == "volume=1"
    assert same_in_space(read_dicom(tmp_path / "fmri", stack="volume=2"), scaled(image, 2))
    dwi = [({"DiffusionBValue": 0}, image), ({"DiffusionBValue": 1000}, scaled(image, 1, 2)),
           ({"DiffusionBValue": 1000}, scaled(image, 1, 3))]  # two gradient directions at b=1000
    multi_stack(tmp_path / "dwi", dwi)
    assert find_series(tmp_path / "dwi").series[0].stacks == ("b=0", "b=1000,volume=1", "b=1000,volume=2")
    assert same_in_space(read_dicom(tmp_path / "dwi", stack="b=1000"), scaled(image, 1, 2))
    assert same_in_space(read_dicom(tmp_path / "dwi", stack="b=1000,volume=2"), scaled(image, 1, 3))


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


def test_a_series_of_several_planes_is_named_for_its_orientations_not_as_stacks(tmp_path):
    uids = {k: pydicom.uid.generate_uid() for k in ("study_instance_uid", "series_instance_uid",
                                                    "frame_of_reference_uid")}
    for plane in ("axial", "sagittal", "coronal"):
        write_series(image_of(plane), tmp_path, prefix=plane, series_description="T2 planes", **uids)
    assert reason_of(tmp_path) == ("not one 3D stack: the series mixes slice orientations (e.g. a 3-plane "
                                   "localizer); not one 3D stack")


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


# ------------------------------------------------------------------ CLI, MAP and batch agree
# segmented: each quirk once, several in one series to keep the MAP runs few; the stacks hold different
# anatomy (phantom seeds), so a wrong choice of stack changes the labels
SEGMENTED = {  # name: (stack given, phantom seed of the stack that must be segmented)
    "jitter_mono1_echo2_dicomdir": ("echo=2", 8),
    "dynamic_time3": ("time=3", 9),
    "diffusion_default_b0": (None, 8),
}
REFUSED = {  # name: (stack given, the reason every face gives)
    "missing_first": (None, "InstanceNumber 1 missing: the first slice(s) are not in the input"),
    "missing_last": (None, "InstanceNumber 28 missing: ImagesInAcquisition is 28"),
    "duplicate": (None, "duplicated slice: instances 5 and 5"),
    "mosaic": (None, "Siemens MOSAIC (16 slices tiled in each image)"),
    "colour": (None, "PhotometricInterpretation RGB: MRAnnotator reads greyscale MR"),
    "unknown_stack": ("time=4", "stack time=4 is not in this series; its stacks: time=1, time=2, time=3"),
}


def seeded(seed: int, orientation: str = "axial") -> nib.Nifti1Image:
    return make_phantom("abdomen", seed=seed, orientation=orientation).image


def build_case(name: str, root: Path) -> Path:
    """The input of one case: a DICOM folder, or the DICOMDIR of a media export."""
    folder = root / name
    if name == "jitter_mono1_echo2_dicomdir":
        uids = {k: pydicom.uid.generate_uid() for k in ("study_instance_uid", "series_instance_uid",
                                                        "frame_of_reference_uid")}
        files = []
        for n, (te, seed) in enumerate((("30", 8), ("10", 7))):
            files += write_series(seeded(seed, "oblique"), root / "export", prefix=f"echo{n}", iop_jitter=1e-8,
                                  photometric="MONOCHROME1", headers={"EchoTime": te}, first_instance_number=1 + 28 * n,
                                  **uids)
        return make_dicomdir(files, folder)
    if name == "dynamic_time3":
        multi_stack(folder, [({"TemporalPositionIdentifier": t}, seeded(6 + t)) for t in (1, 2, 3)])
    elif name == "unknown_stack":
        multi_stack(folder, [({"TemporalPositionIdentifier": t}, seeded(7)) for t in (1, 2, 3)])
    elif name == "diffusion_default_b0":
        multi_stack(folder, [({"DiffusionBValue": 1000}, seeded(7)), ({"DiffusionBValue": 0}, seeded(8))])
    elif name in ("missing_first", "missing_last"):
        files = write_series(seeded(7), folder, headers={"ImagesInAcquisition": 28})
        (files[0] if name == "missing_first" else files[-1]).unlink()
    elif name == "duplicate":
        files = write_series(seeded(7), folder)
        ds = pydicom.dcmread(files[4])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / "copy_of_5.dcm")
    elif name == "mosaic":
        data = voxels(seeded(7))
        files = write_series(nib.Nifti1Image(np.tile(data[:, :, :1], (1, 1, 3)), seeded(7).affine), folder,
                             image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"))
        edit_files(files, siemens_private(0x0A, "US", 16))
    elif name == "colour":
        edit_files(write_series(seeded(7), folder), lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"))
    return folder


def run_cli(source: Path, out: Path, weights: Path, stack: str | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(source), "-o", str(out),
           "--weights", str(weights), "--device", "cpu"] + (["--stack", stack] if stack else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def run_map(source: Path, out: Path, weights: Path, stack: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in HOLOSCAN_VARS and k != "MRANNOTATOR_STACK"}
    env.update({"MRANNOTATOR_DEVICE": "cpu", **({"MRANNOTATOR_STACK": stack} if stack else {})})
    cmd = [sys.executable, str(ROOT / "operators"), "-i", str(source), "-o", str(out), "-m", str(weights)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def batch_read(source: Path, stack: str | None) -> nib.Nifti1Image:
    """The batch path: planning (default stack) and the worker's read, or the public function with ``stack``."""
    from mrannotator.batch.inputs import plan_inputs
    from mrannotator.batch.worker import read_case
    from mrannotator.imageio import load_image

    if stack is None:
        plan = plan_inputs(source)
        assert len(plan.cases) == 1, plan
        return read_case(plan.cases[0])
    series = find_series(source, stack=stack).choose()
    return load_image(load_series(series))


@pytest.fixture(scope="module")
def abdomen_weights(demo_weights, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    shutil.copytree(demo_weights / "Dataset001_Abdomen", root / "Dataset001_Abdomen")
    return root


@pytest.fixture(scope="module")
def segmenter(abdomen_weights):
    import mrannotator

    return mrannotator.Segmenter(weights=abdomen_weights, device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quirks")
    return {name: build_case(name, root) for name in (*SEGMENTED, *REFUSED)}


def test_every_refusal_is_the_same_in_cli_map_and_batch_and_the_map_refuses_before_its_heavy_imports(
        inputs, abdomen_weights, tmp_path):
    from mrannotator.batch.inputs import plan_inputs

    for name, (stack, reason) in REFUSED.items():
        cli = run_cli(inputs[name], tmp_path / "cli" / name, abdomen_weights, stack)
        app = run_map(inputs[name], tmp_path / "map" / name, abdomen_weights, stack)
        for r in (cli, app):
            assert r.returncode == 2 and reason in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-3000:])
        error = cli.stderr[cli.stderr.index("mrannotator: error:"):]
        assert app.stderr.endswith(error), (name, app.stderr[-3000:])  # the same message, word for word
        assert "gxf_executor" not in app.stdout + app.stderr and "loading models" not in cli.stderr
        assert not (tmp_path / "map" / name).exists() or not any((tmp_path / "map" / name).iterdir())
        if stack is None:  # batch: a skipped series with the same reason
            plan = plan_inputs(inputs[name])
            assert not plan.cases and any(reason in s.error for s in plan.skipped), (name, plan.skipped)
        else:
            with pytest.raises(InputError, match=reason):
                find_series(inputs[name], stack=stack).choose()


@pytest.mark.parametrize("name", SEGMENTED)
def test_cli_map_and_batch_segment_each_quirk_voxel_for_voxel(name, inputs, abdomen_weights, segmenter, tmp_path):
    stack, seed = SEGMENTED[name]
    cli = run_cli(inputs[name], tmp_path / "cli", abdomen_weights, stack)
    app = run_map(inputs[name], tmp_path / "map", abdomen_weights, stack)
    for r in (cli, app):
        assert r.returncode == 0, r.stderr[-4000:]
    case = inputs[name].name if inputs[name].is_dir() else "DICOMDIR"
    from_cli = nib.load(tmp_path / "cli" / f"{case}_seg.nii.gz")
    from_map = nib.load(tmp_path / "map" / LABELS_FILE)
    from_batch = segmenter.segment(batch_read(inputs[name], stack)).labels
    assert len(np.unique(voxels(from_cli))) > 3, "the model found (almost) nothing: nothing compared"
    for other in (from_map, from_batch):
        assert np.allclose(other.affine, from_cli.affine, atol=1e-6)
        assert int((voxels(other) != voxels(from_cli)).sum()) == 0
    # the stack asked for was segmented: the labels of that stack's own phantom, segmented from NIfTI
    orientation = "oblique" if "jitter" in name else "axial"
    from_nifti = segmenter.segment(seeded(seed, orientation)).labels
    assert same_in_space(from_map, from_nifti) or (
        orientation == "oblique" and np.array_equal(voxels(from_map), voxels(from_nifti)))
    assert (tmp_path / "map" / SEG_FILE).is_file()  # the SEG written, orientation jitter and all
