"""The MONAI Deploy app and its MAP: DICOM MR study in, DICOM SEG out (issue 4).

Real DICOM series are written from the real MR sample and from phantoms acquired axial, sagittal,
coronal and head-to-feet; the app runs as a real process (`python operators ...`) on the demo
weights; the packager is the real `monai-deploy package` with a stand-in `docker` on PATH.
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

from mrannotator.catalogue import load_catalogue
from mrannotator.dicom import labels_from_seg
from mrannotator.phantoms import make_phantom
from mrannotator.testing.dicom_fixtures import read_series, write_series

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "operators"
SEG_FILE, LABELS_FILE, STATS_FILE = "mrannotator_seg.dcm", "mrannotator_labels.nii.gz", "mrannotator_structures.json"
PHANTOM_ACQUISITIONS = ("axial", "sagittal", "coronal", "axial_reversed")
# axial: the usual DICOM axial (rows to the patient's left, columns to posterior, slices feet to head);
# axial_reversed: the same planes acquired head to feet (ImagePositionPatient falls along the normal)
STORAGE = {"axial": "LPS", "sagittal": "sagittal", "coronal": "coronal", "axial_reversed": "LPS"}
HOLOSCAN_VARS = ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH")

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) missing")


def dciodvfy_errors(path: Path) -> list[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def phantom(acq: str, seed: int = 7):
    """(image, labels) of the abdomen phantom stored as acquired in ``acq``."""
    ph = make_phantom("abdomen", seed=seed, orientation=STORAGE[acq])
    if acq != "axial_reversed":
        return ph.image, ph.labels
    flip = np.array([[0, 1], [1, 1], [2, -1]])  # LPS -> LPI: same voxels, slices stored head to feet
    return ph.image.as_reoriented(flip), ph.labels.as_reoriented(flip)


def run_app(args: list[str], env: dict | None = None, app: Path = APP, cwd: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if k not in HOLOSCAN_VARS}
    full_env.update({"MRANNOTATOR_DEVICE": "cpu", **(env or {})})
    return subprocess.run([sys.executable, str(app), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=600)


# ------------------------------------------------------------------ fixtures: real DICOM studies
@pytest.fixture(scope="session")
def studies(tmp_path_factory, real_mr) -> dict[str, Path]:
    """One folder per study: the real MR, four phantom acquisitions, an MR+CT study, a CT-only study."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    write_series(real_mr, root / "real_mr", series_description="real abdominal MR (TotalSegmentator sample)")
    out["real_mr"] = root / "real_mr"
    for acq in PHANTOM_ACQUISITIONS:
        if acq != "axial":
            write_series(phantom(acq)[0], root / f"phantom_{acq}", series_description=f"T2 phantom {acq}")
            out[f"phantom_{acq}"] = root / f"phantom_{acq}"

    # MR + CT study: the CT and a derived MR are larger than the MR; a localizer and a smaller MR too
    mixed = root / "mr_ct"
    image = phantom("axial")[0]
    img = np.asanyarray(image.dataobj)
    study = pydicom.uid.generate_uid()
    common = {"study_instance_uid": study, "frame_of_reference_uid": pydicom.uid.generate_uid()}
    write_series(image, mixed / "mr", series_number=3, series_description="T2 abdomen", **common)
    big = nib.Nifti1Image(np.concatenate([img, img], axis=2), image.affine)
    write_series(big, mixed / "ct", modality="CT", series_number=2, series_description="CT abdomen", **common)
    write_series(big, mixed / "derived", series_number=4, series_description="T2 MPR",
                 image_type=("DERIVED", "SECONDARY", "MPR"), **common)
    slab = nib.Nifti1Image(img[:, :, :12], image.affine)  # a smaller 3D MR series: the larger one wins
    write_series(slab, mixed / "slab", series_number=5, series_description="T1 slab", **common)
    loc = nib.Nifti1Image(img[:, :, 10:13], image.affine)
    write_series(loc, mixed / "loc", series_number=1, series_description="3-plane loc",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **common)
    out["mr_ct"] = mixed
    out["phantom_axial"] = mixed / "mr"  # the axial acquisition, as a folder of its own for the engine
    write_series(big, root / "ct_only", modality="CT", series_description="CT abdomen")
    out["ct_only"] = root / "ct_only"
    return out


class AppRuns:
    """The app run once per study (-i/-o/-m), on first use; later tests reuse the outputs."""

    def __init__(self, studies, weights, root):
        self.studies, self.weights, self.root, self.done = studies, weights, root, {}

    def __getitem__(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        name = "mr_ct" if name == "phantom_axial" else name  # the axial phantom is that study's MR series
        if name not in self.done:
            out = self.root / name
            self.done[name] = (run_app(["-i", str(self.studies[name]), "-o", str(out), "-m", str(self.weights)]), out)
        return self.done[name]


@pytest.fixture(scope="session")
def app_runs(studies, demo_weights, tmp_path_factory) -> AppRuns:
    return AppRuns(studies, demo_weights, tmp_path_factory.mktemp("app_out"))


def model_equipment(seg):
    """The Contributing Equipment item that describes the model (highdicom adds one for itself)."""
    items = [i for i in seg.ContributingEquipmentSequence if i.Manufacturer == "MRAnnotator project"]
    assert len(items) == 1
    return items[0]


def gdcm_volume(folder: Path) -> nib.Nifti1Image:
    """The one series in ``folder`` read by SimpleITK/GDCM: a reader independent of mrannotator.dicom."""
    import SimpleITK as sitk

    from mrannotator.imageio import from_sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return from_sitk(reader.Execute())


def engine_labels(segmenter, folder: Path) -> nib.Nifti1Image:
    """The engine alone on the same series (read by SimpleITK/GDCM, an independent geometry path)."""
    return segmenter.segment(gdcm_volume(folder)).labels


# ------------------------------------------------------------------ the fixtures are real DICOM
@needs_dciodvfy
def test_fixture_series_pass_dciodvfy(studies):
    checked = 0
    for folder in studies.values():
        files = sorted(folder.rglob("*.dcm"))
        for f in {files[0], files[len(files) // 2], files[-1]}:
            assert dciodvfy_errors(f) == [], f
            checked += 1
    assert checked >= 3 * len(studies)


@pytest.mark.parametrize("acq", PHANTOM_ACQUISITIONS)
def test_fixture_geometry_per_slice(studies, acq):
    """ImagePositionPatient / ImageOrientationPatient per slice put every voxel where the phantom has it."""
    image, _ = phantom(acq)
    datasets, vol = read_series(studies[f"phantom_{acq}"])  # sorted along the slice normal
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    first = pydicom.dcmread(sorted(studies[f"phantom_{acq}"].iterdir())[0])
    if acq == "axial_reversed":
        # the usual axial planes, but instance 1 is the most superior slice: positions fall along the normal
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert numbers == sorted(numbers, reverse=True)
    elif acq == "axial":
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert numbers == sorted(numbers)
    src = nib.orientations.io_orientation(image.affine)
    tr = nib.orientations.ornt_transform(src, nib.orientations.io_orientation(vol.affine))
    expected = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), tr)
    assert np.array_equal(np.asanyarray(vol.dataobj), expected)
    exp_aff = image.affine @ nib.orientations.inv_ornt_aff(tr, image.shape)
    assert np.allclose(vol.affine, exp_aff, atol=1e-4)


@pytest.mark.parametrize("region,orientation", [("pelvis", "LAS"), ("abdomen", "oblique")])
def test_series_geometry_matches_simpleitk(tmp_path, region, orientation):
    """Non-square pixels (pelvis: 4 x 6 mm) and a tilted acquisition: the affine the app builds from the
    instance headers equals SimpleITK's, voxel for voxel (the SDK's own affine swaps the pixel spacings)."""
    ph = make_phantom(region, seed=3, orientation=orientation)
    write_series(ph.image, tmp_path)
    _, mine = read_series(tmp_path)
    ref = gdcm_volume(tmp_path)
    assert np.array_equal(np.asanyarray(mine.dataobj), np.asanyarray(ref.dataobj))
    assert np.allclose(mine.affine, ref.affine, atol=1e-4)


# ------------------------------------------------------------------ DICOM SEG from the app
@pytest.mark.parametrize("name", ["real_mr", *(f"phantom_{a}" for a in PHANTOM_ACQUISITIONS)])
def test_app_seg_equals_engine(name, studies, app_runs, segmenter):
    r, out = app_runs[name]
    assert r.returncode == 0, r.stderr[-4000:]
    expected = engine_labels(segmenter, studies[name])
    present = sorted(set(np.unique(np.asanyarray(expected.dataobj)).tolist()) - {0})
    assert present, f"the demo weights found nothing in {name}: nothing to compare"
    seg = pydicom.dcmread(out / SEG_FILE)
    datasets, _ = read_series(studies[name])
    rebuilt = labels_from_seg(seg, datasets)  # highdicom, per source instance
    assert np.allclose(rebuilt.affine, expected.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(rebuilt.dataobj), np.asanyarray(expected.dataobj))
    # the labels NIfTI is the same map, and the statistics list the same structures
    nifti = nib.load(out / LABELS_FILE)
    assert np.array_equal(np.asanyarray(nifti.dataobj), np.asanyarray(expected.dataobj))
    stats = json.loads((out / STATS_FILE).read_text())
    assert [row["id"] for row in stats["structures"]] == present
    voxels = np.bincount(np.asanyarray(expected.dataobj).ravel())
    for row in stats["structures"]:
        assert row["voxels"] == voxels[row["id"]] and row["snomed_type"]["code"] and row["volume_ml"] > 0
    assert stats["series_instance_uid"] == datasets[0].SeriesInstanceUID


@needs_dciodvfy
@pytest.mark.parametrize("name", ["real_mr", *(f"phantom_{a}" for a in PHANTOM_ACQUISITIONS)])
def test_app_seg_passes_dciodvfy(name, app_runs):
    r, out = app_runs[name]
    assert r.returncode == 0, r.stderr[-4000:]
    assert dciodvfy_errors(out / SEG_FILE) == []


def test_seg_segments_codes_and_model_info(app_runs, studies, demo_weights):
    r, out = app_runs["phantom_axial"]
    assert r.returncode == 0, r.stderr[-4000:]
    seg = pydicom.dcmread(out / SEG_FILE)
    cat = load_catalogue()
    src = read_series(studies["phantom_axial"])[0][0]
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    n_slices = len(read_series(studies["phantom_axial"])[0])
    assert seg.NumberOfFrames < len(seg.SegmentSequence) * n_slices  # empty frames omitted
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    assert numbers == list(range(1, len(numbers) + 1))
    import highdicom as hd

    for item in seg.SegmentSequence:
        s = cat.get(item.TrackingID)
        assert item.SegmentLabel == s.display
        t = item.SegmentedPropertyTypeCodeSequence[0]
        assert (t.CodingSchemeDesignator, t.CodeValue, t.CodeMeaning) == (s.type.scheme, s.type.code, s.type.meaning)
        c = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (c.CodingSchemeDesignator, c.CodeValue) == (s.category.scheme, s.category.code)
        modifiers = getattr(t, "SegmentedPropertyTypeModifierCodeSequence", [])
        if s.laterality is None:
            assert not modifiers
        else:
            assert [(m.CodeValue, m.CodeMeaning) for m in modifiers] == [(s.laterality.code, s.laterality.meaning)]
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(rgb, s.color, atol=2)
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert item.SegmentAlgorithmType == "AUTOMATIC" and algo.AlgorithmName == "MRAnnotator"
        params = str(algo.AlgorithmParameters)
        assert "Dataset001_Abdomen" in params and "weights" in params
    # both kidneys: laterality as modifier, same type code
    names = {item.TrackingID for item in seg.SegmentSequence}
    assert {"kidney_left", "kidney_right"} <= names
    # the codes as written, against SNOMED CT itself (not the catalogue the writer reads)
    by_name = {item.TrackingID: item for item in seg.SegmentSequence}
    for name, lat in (("kidney_right", ("24028007", "Right")), ("kidney_left", ("7771000", "Left"))):
        t = by_name[name].SegmentedPropertyTypeCodeSequence[0]
        assert (t.CodingSchemeDesignator, t.CodeValue, t.CodeMeaning) == ("SCT", "64033007", "Kidney")
        m = t.SegmentedPropertyTypeModifierCodeSequence[0]
        assert (m.CodingSchemeDesignator, m.CodeValue, m.CodeMeaning) == ("SCT", *lat)
    liver = by_name["liver"].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodeValue, liver.CodeMeaning) == ("10200004", "Liver")
    # ModelInfo in the contributing equipment: Manufacturer filled (dciodvfy errors without it)
    eq = model_equipment(seg)
    assert eq.Manufacturer == "MRAnnotator project"
    assert "nnU-Net" in eq.ManufacturerModelName and eq.SoftwareVersions and eq.DeviceUID
    # the Device UID identifies the weights: the same on every run with the same weights
    other = pydicom.dcmread(app_runs["phantom_sagittal"][1] / SEG_FILE)
    assert model_equipment(other).DeviceUID == eq.DeviceUID
    assert seg.Manufacturer == "MRAnnotator"


# ------------------------------------------------------------------ series selection
def test_mr_ct_study_segments_only_the_mr_series(app_runs, studies):
    r, out = app_runs["mr_ct"]
    assert r.returncode == 0, r.stderr[-4000:]
    seg = pydicom.dcmread(out / SEG_FILE)
    mr = read_series(studies["mr_ct"] / "mr")[0]
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {mr[0].SeriesInstanceUID}
    sources = {src.ReferencedSOPInstanceUID
               for frame in seg.PerFrameFunctionalGroupsSequence
               for derivation in frame.DerivationImageSequence
               for src in derivation.SourceImageSequence}
    assert sources <= {ds.SOPInstanceUID for ds in mr}
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["series_instance_uid"] == mr[0].SeriesInstanceUID
    log = r.stdout + r.stderr
    assert "modality CT" in log and "localizer" in log and "derived image" in log
    assert log.count(": candidate") == 2 and "selected series 3 'T2 abdomen'" in log


def test_study_without_mr_fails_clearly_and_writes_nothing(app_runs):
    r, out = app_runs["ct_only"]
    assert r.returncode == 2
    assert "mrannotator: error: no MR series to segment" in r.stderr
    assert "modality CT: MRAnnotator segments MR only" in r.stderr
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------ the MAP
def test_package_with_monai_deploy_and_run_from_its_layout(tmp_path, demo_weights, studies, app_runs):
    keep = tmp_path / "context"
    env = {**os.environ, "PATH": f"{ROOT / 'packaging' / 'standin-docker'}{os.pathsep}{os.environ['PATH']}",
           "STANDIN_DOCKER_KEEP": str(keep)}
    r = subprocess.run([sys.executable, str(ROOT / "packaging" / "package.py"), "-m", str(demo_weights),
                        "-t", "mrannotator:0.1.0", "--stage", str(tmp_path / "stage")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "Succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
    calls = [json.loads(line) for line in (tmp_path / "context.calls.log").read_text().splitlines()]
    assert any(c[:2] == ["buildx", "build"] for c in calls)

    dockerfile = (keep / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/cuda:13.0.0-runtime-ubuntu24.04" in dockerfile  # from packaging/artifacts.json
    for line in ("COPY ./app /opt/holoscan/app", "COPY ./models  /opt/holoscan/models",
                 "ENV HOLOSCAN_MODEL_PATH=/opt/holoscan/models", "ENV HOLOSCAN_INPUT_PATH=/var/holoscan/input",
                 "pip install --no-cache-dir --user -r /tmp/requirements.txt",
                 "pip install monai-deploy-app-sdk==4.0.0", 'ENTRYPOINT ["/var/holoscan/tools"]'):
        assert line in dockerfile, line
    assert "PYTHONPATH" not in dockerfile  # the engine travels inside the app folder, not via --add
    requirements = (keep / "pip" / "requirements.txt").read_text()
    for pkg in ("monai-deploy-app-sdk==4.0.0", "holoscan-cu13==4.2.0", "nnunetv2==2.8.1", "highdicom", "monai"):
        assert pkg in requirements, pkg

    app_json = json.loads((keep / "map" / "app.json").read_text())
    assert json.loads(app_json["command"]) == ["python3", "/opt/holoscan/app"]
    assert app_json["input"]["formats"] == ["file"] and app_json["output"]["formats"] == ["file"]
    assert app_json["version"] == "0.1.0" and app_json["sdk"] == "monai-deploy"
    assert app_json["environment"]["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    pkg_json = json.loads((keep / "map" / "pkg.json").read_text())
    datasets = sorted(p.name for p in demo_weights.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    assert sorted(pkg_json["models"]) == datasets
    assert pkg_json["models"][datasets[0]] == f"/opt/holoscan/models/{datasets[0]}"
    assert pkg_json["resources"]["cpu"] >= 1 and pkg_json["resources"]["memory"].endswith("Gi")

    # model layout: each dataset once, complete, readable by the engine
    assert sorted(p.name for p in (keep / "models").iterdir()) == datasets
    from mrannotator.weights import find_model_folders

    folders = find_model_folders(keep / "models")
    assert sorted(f.dataset for f in folders) == datasets
    assert all(f.checkpoint.is_file() for f in folders)
    assert (keep / "app" / "__main__.py").is_file() and (keep / "app" / "mrannotator" / "__init__.py").is_file()
    assert (keep / "app" / "mrannotator" / "data" / "catalogue.toml").is_file()

    # run it from the package layout, configured the MAP way (HOLOSCAN_* only, no arguments)
    out = tmp_path / "output"
    run = run_app([], app=keep / "app", cwd=tmp_path, env={
        "HOLOSCAN_INPUT_PATH": str(studies["real_mr"]), "HOLOSCAN_OUTPUT_PATH": str(out),
        "HOLOSCAN_MODEL_PATH": str(keep / "models")})
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"engine: mrannotator 0.1.0 from {keep / 'app' / 'mrannotator'}" in run.stdout + run.stderr
    packaged, direct = pydicom.dcmread(out / SEG_FILE), pydicom.dcmread(app_runs["real_mr"][1] / SEG_FILE)
    source = read_series(studies["real_mr"])[0]
    assert np.array_equal(np.asanyarray(labels_from_seg(packaged, source).dataobj),
                          np.asanyarray(labels_from_seg(direct, source).dataobj))
    assert [s.TrackingID for s in packaged.SegmentSequence] == [s.TrackingID for s in direct.SegmentSequence]
    assert model_equipment(packaged).DeviceUID == model_equipment(direct).DeviceUID
