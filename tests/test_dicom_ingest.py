"""One DICOM ingestion path (issue 11): the CLI, the Python API and the MONAI Deploy app read DICOM the same way.

Real series are written from phantoms in every transfer syntax tested and in every acquisition
plane; broken studies (a missing slice, a dangling symlink, symlink loops, a CT, a localizer, a
derived series, a damaged file) are built on disk. The CLI and the app run as real processes on
the demo abdomen model (alone, so each run stays short); the API runs in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

import mrannotator
from mrannotator.dicom import MIN_SLICES, find_series, load_series, read_dicom
from mrannotator.errors import InputError
from mrannotator.imageio import load_image
from mrannotator.phantoms import make_phantom
from mrannotator.testing.dicom_fixtures import TRANSFER_SYNTAXES, write_series

ROOT = Path(__file__).resolve().parents[1]
HOLOSCAN_VARS = ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH")
LABELS_FILE, SEG_FILE = "mrannotator_labels.nii.gz", "mrannotator_seg.dcm"
MISSING_SLICE = 14  # 0-based index of the slice deleted from the incomplete series
# axial: slices in all 8 transfer syntaxes, with a dangling symlink and symlink loops in the folder;
# oblique_iop6: 6-decimal cosines, beside a larger series: picked by its UID (--series / MRANNOTATOR_SERIES).
# Sagittal and coronal series are compared in bench/dicom_faces.py (test_map.py runs the app on them).
GOOD_CASES = ("axial_syntaxes_links", "axial_reversed", "oblique_iop6")


def phantom(orientation: str = "axial") -> nib.Nifti1Image:
    return make_phantom("abdomen", seed=7, orientation=orientation).image


def same_voxels_in_space(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-4) -> bool:
    """``a`` and ``b`` hold the same value at every physical position (voxel axes may be permuted / flipped)."""
    tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(a.affine),
                                         nib.orientations.io_orientation(b.affine))
    moved = nib.orientations.apply_orientation(np.asanyarray(a.dataobj), tr)
    moved_affine = a.affine @ nib.orientations.inv_ornt_aff(tr, a.shape)
    return bool(np.array_equal(moved, np.asanyarray(b.dataobj)) and np.allclose(moved_affine, b.affine, atol=atol))


def add_broken_links(folder: Path) -> None:
    """A dangling symlink, a symlink to itself, a folder link back to the series folder, a second path to a file."""
    os.symlink(folder / "deleted_0000.dcm", folder / "aaa_dangling.dcm")  # listed first: GDCM stopped here
    os.symlink("self_loop.dcm", folder / "self_loop.dcm")
    os.symlink(".", folder / "loop")
    os.symlink(sorted(folder.glob("mr*.dcm"))[3].name, folder / "second_path.dcm")


def mixed_syntax_series(image, folder: Path, scratch: Path) -> None:
    """One series whose slice k is stored in the k-th transfer syntax (round robin): one run decodes all."""
    uids = {k: pydicom.uid.generate_uid() for k in ("study_instance_uid", "series_instance_uid",
                                                    "frame_of_reference_uid")}
    written = [write_series(image, scratch / name, transfer_syntax=syntax, **uids)
               for name, syntax in TRANSFER_SYNTAXES.items()]
    folder.mkdir(parents=True)
    for k in range(image.shape[2]):
        src = written[k % len(written)][k]
        shutil.move(src, folder / src.name)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ingest")
    out = {name: root / name for name in (*GOOD_CASES, "missing_slice")}
    mixed_syntax_series(phantom("axial"), out["axial_syntaxes_links"], root / "scratch")
    add_broken_links(out["axial_syntaxes_links"])
    write_series(phantom("axial_reversed"), out["axial_reversed"])
    write_series(phantom("oblique"), out["oblique_iop6"] / "oblique", iop_decimals=6, series_number=7)
    data = np.asanyarray(phantom("axial").dataobj)
    larger = nib.Nifti1Image(np.concatenate([data, data], axis=2), phantom("axial").affine)
    write_series(larger, out["oblique_iop6"] / "larger", series_number=8)
    files = write_series(phantom("axial"), out["missing_slice"])
    files[MISSING_SLICE].unlink()
    return out


@pytest.fixture(scope="module")
def abdomen_weights(demo_weights, tmp_path_factory) -> Path:
    """The demo abdomen model alone: the faces are compared, not the regions, and each run stays short."""
    root = tmp_path_factory.mktemp("weights")
    shutil.copytree(demo_weights / "Dataset001_Abdomen", root / "Dataset001_Abdomen")
    return root


def series_uid_of(folder: Path) -> str:
    return pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID


class Runs:
    """Each face run once per case, on first use (real processes for the CLI and the app)."""

    def __init__(self, cases, weights, root):
        self.cases, self.weights, self.root = cases, weights, root
        self.cli_done, self.map_done = {}, {}
        self.series_uid = {"oblique_iop6": series_uid_of(cases["oblique_iop6"] / "oblique")}

    def cli(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in self.cli_done:
            out = self.root / "cli" / name
            cmd = [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(self.cases[name]), "-o", str(out),
                   "--weights", str(self.weights), "--device", "cpu"]
            if name in self.series_uid:
                cmd += ["--series", self.series_uid[name]]
            self.cli_done[name] = (subprocess.run(cmd, capture_output=True, text=True, timeout=600), out)
        return self.cli_done[name]

    def app(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in self.map_done:
            out = self.root / "map" / name
            env = {k: v for k, v in os.environ.items() if k not in HOLOSCAN_VARS}
            env.update({"MRANNOTATOR_DEVICE": "cpu", "MRANNOTATOR_SERIES": self.series_uid.get(name, "")})
            cmd = [sys.executable, str(ROOT / "operators"), "-i", str(self.cases[name]), "-o", str(out),
                   "-m", str(self.weights)]
            self.map_done[name] = (subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600), out)
        return self.map_done[name]

    def api(self, segmenter, name: str) -> nib.Nifti1Image:
        return segmenter.segment(load_image(self.cases[name], series_uid=self.series_uid.get(name))).labels


@pytest.fixture(scope="module")
def runs(cases, abdomen_weights, tmp_path_factory) -> Runs:
    return Runs(cases, abdomen_weights, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def api(abdomen_weights):
    return mrannotator.Segmenter(weights=abdomen_weights, device="cpu")


# ------------------------------------------------------------------ decoding and geometry (no model)
@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES)
def test_every_transfer_syntax_reads_the_same_voxels(syntax, tmp_path):
    image = phantom("axial")
    files = write_series(image, tmp_path, transfer_syntax=TRANSFER_SYNTAXES[syntax])
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    volume = read_dicom(tmp_path)
    assert volume.get_data_dtype() == np.int16
    assert same_voxels_in_space(volume, image)


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "axial_reversed", "oblique"])
def test_every_acquisition_plane_reads_where_the_phantom_is(orientation, tmp_path):
    image = phantom(orientation)
    write_series(image, tmp_path)
    assert same_voxels_in_space(read_dicom(tmp_path), image)


def test_six_decimal_orientation_cosines_give_exact_spacings(tmp_path):
    """Scanners write ImageOrientationPatient with 6 decimals: not unit vectors. Multiplied by PixelSpacing
    as they are, the spacing came out 0.99999997 of the true one and nnU-Net's resampled size could round
    to another integer (923 voxels differed between CLI and app)."""
    image = phantom("oblique")
    files = write_series(image, tmp_path, iop_decimals=6)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
    assert np.abs(np.linalg.norm(cosines, axis=1) - 1).max() > 1e-8  # the case is really there
    volume = read_dicom(tmp_path)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    pixel_spacing = [float(v) for v in ds.PixelSpacing][::-1]  # [columns, rows] = voxel axes i, j
    assert np.allclose(spacing[:2], pixel_spacing, rtol=1e-13, atol=0)  # not 0.99999997 of it
    assert spacing[2] == pytest.approx(6.0, abs=1e-6)
    assert same_voxels_in_space(volume, image, atol=1e-3)
    # what the engine then sees: the NIfTI header's float32 copy, still the written spacing to float32 precision
    assert np.allclose(np.linalg.norm(load_image(tmp_path).affine[:3, :2], axis=0),
                       pixel_spacing, rtol=2e-7, atol=0)


def test_scan_names_every_series_and_every_skipped_path(tmp_path):
    image = phantom("axial")
    data = np.asanyarray(image.dataobj)
    study = {"study_instance_uid": pydicom.uid.generate_uid()}
    write_series(image, tmp_path / "t2", series_number=3, series_description="T2 abdomen", **study)
    small = nib.Nifti1Image(data[:, :, :MIN_SLICES], image.affine)
    write_series(small, tmp_path / "slab", series_number=5, series_description="T1 slab", **study)
    big = nib.Nifti1Image(np.concatenate([data, data], axis=2), image.affine)
    write_series(big, tmp_path / "ct", modality="CT", series_number=2, **study)
    write_series(big, tmp_path / "mpr", series_number=4, image_type=("DERIVED", "SECONDARY", "MPR"), **study)
    loc = nib.Nifti1Image(data[:, :, 10:13], image.affine)
    write_series(loc, tmp_path / "loc", series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **study)
    gap = write_series(big, tmp_path / "gap", series_number=6, series_description="T2 big, one slice lost", **study)
    gap[20].unlink()
    echoes = {"series_instance_uid": pydicom.uid.generate_uid(), "series_number": 9, **study}
    for echo in ("te1", "te2"):  # two echoes in one series: every position twice
        write_series(image, tmp_path / "multi_echo" / echo, prefix=echo, **echoes)
    (tmp_path / "notes.txt").write_text("not DICOM")
    add_broken_links(tmp_path / "t2")

    scan = find_series(tmp_path)
    assert [s.header.SeriesDescription for s in scan.series] == ["T2 abdomen", "T1 slab"]  # largest first
    t2 = scan.series[0]
    assert len(t2.files) == image.shape[2] and t2.shape == image.shape and t2.voxels == data.size
    assert t2.header.PatientID and t2.header.Manufacturer and t2.header.MagneticFieldStrength == 1.5
    assert "PixelData" not in t2.header  # headers only: pixels are decoded by load_series
    reasons = {int(scan_number(r)): r.reason for r in scan.rejected}
    assert reasons[2] == "modality CT: MRAnnotator segments MR only"
    assert reasons[4].startswith("derived image") and reasons[1] == "localizer / scout"
    assert "gaps 6.000..12.000 mm" in reasons[6] and "incomplete" in reasons[6]
    assert reasons[9].startswith("duplicated slice: instances 1 and 1")  # same headers: copies, not echoes
    skipped = {p.name: why for p, why in scan.skipped}
    assert skipped["notes.txt"] == "not a DICOM file"
    assert skipped["aaa_dangling.dcm"].startswith("dangling symlink")
    assert skipped["self_loop.dcm"] == "symlink loop" and skipped["loop"].startswith("symlink loop")
    assert skipped["second_path.dcm"].startswith("same file as")
    assert same_voxels_in_space(load_series(t2), image)


def scan_number(rejected) -> str:
    return rejected.description.split()[1]


def test_each_series_is_sorted_once_from_scan_to_seg(tmp_path, monkeypatch):
    """The MAP's path (find_series -> load_series -> make_seg) sorts each series once, in find_series."""
    from mrannotator.catalogue import load_catalogue
    from mrannotator.dicom import geometry, ingest, make_seg
    from mrannotator.dicom import seg as seg_module

    sorted_series = []

    def counting(datasets):
        sorted_series.append(datasets[0].SeriesInstanceUID)
        return geometry.stack_geometry(datasets)

    monkeypatch.setattr(ingest, "stack_geometry", counting)
    monkeypatch.setattr(seg_module, "stack_geometry", counting)
    ph = make_phantom("abdomen", seed=7, orientation="axial")
    write_series(ph.image, tmp_path / "a", series_number=1)
    write_series(ph.image, tmp_path / "b", series_number=2)
    scan = find_series(tmp_path)
    series = scan.series[0]
    volume = load_series(series)
    labels = nib.Nifti1Image(np.asanyarray(ph.labels.dataobj), volume.affine)  # same stored order (axial)
    assert same_voxels_in_space(volume, ph.image)
    seg = make_seg(labels, load_catalogue().structures, series.datasets, weights={"source": "test"},
                   source_affine=series.affine)
    assert sorted(sorted_series) == sorted(s.uid for s in scan.series)  # once each, none in make_seg
    assert len(seg.SegmentSequence) == len(ph.structures)


def test_series_uid_picks_or_names_the_problem(tmp_path):
    image = phantom("axial")
    data = np.asanyarray(image.dataobj)
    write_series(image, tmp_path / "big", series_number=1)
    small = write_series(nib.Nifti1Image(data[:, :, :MIN_SLICES], image.affine), tmp_path / "small", series_number=2)
    uid = pydicom.dcmread(small[0]).SeriesInstanceUID
    assert read_dicom(tmp_path, series_uid=uid).shape == (*data.shape[:2], MIN_SLICES)
    with pytest.raises(InputError, match="series 1.2.3 not found in .*; series there: "):
        read_dicom(tmp_path, series_uid="1.2.3")
    small[4].unlink()
    with pytest.raises(InputError, match=f"series {uid} in .* cannot be segmented: only {MIN_SLICES - 1} slices"):
        read_dicom(tmp_path, series_uid=uid)


def test_damaged_pixel_data_names_the_file_and_its_syntax(tmp_path):
    files = write_series(phantom("axial"), tmp_path, transfer_syntax=TRANSFER_SYNTAXES["jpeg_lossless_sv1"])
    ds = pydicom.dcmread(files[5])
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 40])
    ds.save_as(files[5])
    with pytest.raises(InputError, match=f"cannot decode the pixel data of {files[5]} .JPEG Lossless"):
        read_dicom(tmp_path)


def test_no_dicom_at_all_is_named(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series found in .*\n  skipped .*readme.txt: not a DICOM file"):
        read_dicom(tmp_path)


# ------------------------------------------------------------------ CLI, API and app agree
def labels_of(run: tuple[subprocess.CompletedProcess, Path], name: str) -> nib.Nifti1Image:
    r, out = run
    assert r.returncode == 0, r.stderr[-4000:]
    path = out / LABELS_FILE if (out / LABELS_FILE).exists() else out / f"{name}_seg.nii.gz"
    return nib.load(path)


@pytest.mark.parametrize("name", GOOD_CASES)
def test_cli_api_and_app_give_the_same_labels(name, cases, runs, api):
    from mrannotator.dicom import labels_from_seg

    cli, app, in_process = labels_of(runs.cli(name), name), labels_of(runs.app(name), name), runs.api(api, name)
    assert len(np.unique(np.asanyarray(cli.dataobj))) > 3, "the model found (almost) nothing: nothing compared"
    for other in (app, in_process):
        assert np.allclose(other.affine, cli.affine, atol=1e-6)
        assert np.array_equal(np.asanyarray(other.dataobj), np.asanyarray(cli.dataobj))
    series = find_series(cases[name]).choose(runs.series_uid.get(name))
    assert cli.shape == series.shape and sorted(series.shape) == sorted(phantom("axial").shape)  # every slice read
    from_seg = labels_from_seg(pydicom.dcmread(runs.app(name)[1] / SEG_FILE), series.datasets)
    assert np.array_equal(np.asanyarray(from_seg.dataobj), np.asanyarray(cli.dataobj))
    stats = json.loads((runs.app(name)[1] / "mrannotator_structures.json").read_text())
    assert stats["series_instance_uid"] == series.uid


def test_dicom_labels_equal_the_nifti_labels_with_six_decimal_cosines(cases, runs, api):
    """The 6-decimal oblique series segments exactly like the phantom's own NIfTI (same spacing, same grid)."""
    from_nifti = api.segment(phantom("oblique")).labels
    assert same_voxels_in_space(labels_of(runs.app("oblique_iop6"), "oblique_iop6"), from_nifti, atol=1e-3)


def test_symlinks_are_skipped_reported_and_the_whole_series_read(cases, runs):
    folder = cases["axial_syntaxes_links"]
    n_slices = len(list(folder.glob("mr*.dcm")))
    for r, _ in (runs.cli("axial_syntaxes_links"), runs.app("axial_syntaxes_links")):
        assert r.returncode == 0, r.stderr[-4000:]
        log = r.stdout + r.stderr
        for name, reason in (("aaa_dangling.dcm", "dangling symlink"), ("self_loop.dcm", "symlink loop"),
                             ("loop", "symlink loop (a folder already listed)")):
            assert f"skipped {folder / name}: {reason}" in log, log[-3000:]
    labels = labels_of(runs.app("axial_syntaxes_links"), "axial_syntaxes_links")
    assert labels.shape[2] == n_slices == phantom("axial").shape[2]


def test_incomplete_stack_is_refused_the_same_way_everywhere(cases, runs, abdomen_weights):
    reason = "gaps 6.000..12.000 mm"
    for r, out in (runs.cli("missing_slice"), runs.app("missing_slice")):
        assert r.returncode == 2, r.stderr[-4000:]
        assert "mrannotator: error: no MR series to segment" in r.stderr and reason in r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists() or not any(out.iterdir())
    with pytest.raises(InputError, match=reason):
        mrannotator.segment(cases["missing_slice"], weights=abdomen_weights, device="cpu")


def test_a_series_uid_not_in_the_folder_is_refused(cases, abdomen_weights, tmp_path):
    folder = cases["oblique_iop6"]
    cmd = [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(folder), "-o", str(tmp_path / "o"),
           "--weights", str(abdomen_weights), "--series", "1.2.3.4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and f"series 1.2.3.4 not found in {folder}; series there: " in r.stderr
    assert series_uid_of(folder / "oblique") in r.stderr and not (tmp_path / "o").exists()
