"""OHIF 3.13 support without a browser: the installer's sub-path rewrite, the viewer's config and files, and
the Label Map SEG frames OHIF 3.13 exports (placed by reference, refused when position and reference disagree)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from mrannotator.dicom.labelmap_seg import labelmap_pixels

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_rewrites_the_prebuilt_public_path_to_the_viewer_mount(tmp_path):
    install = _module("install_ohif", ROOT / "scripts" / "install_ohif.py")
    (tmp_path / "index.html").write_text('<script>window.PUBLIC_URL="/"</script><script src="/app.js"></script>'
                                         '<a href="https://x.org/">x</a><link href="/app.css">')
    (tmp_path / "app.js").write_text('__webpack_require__.p = "/";')
    (tmp_path / "app.css").write_text("@font-face{src:url(/f.woff2)}")
    assert install.rewrite(tmp_path) == 1
    html = (tmp_path / "index.html").read_text()
    assert 'PUBLIC_URL="/viewer/"' in html and 'src="/viewer/app.js"' in html and 'href="/viewer/app.css"' in html
    assert 'href="https://x.org/"' in html
    assert (tmp_path / "app.js").read_text() == '__webpack_require__.p = "/viewer/";'
    assert "url(/viewer/f.woff2)" in (tmp_path / "app.css").read_text()
    (tmp_path / "index.html").write_text("<html></html>")
    with pytest.raises(SystemExit, match="not the one pinned"):
        install.rewrite(tmp_path)


def test_install_refuses_a_tarball_that_is_not_the_pinned_one(tmp_path):
    install = _module("install_ohif", ROOT / "scripts" / "install_ohif.py")
    fake = tmp_path / "ohif-app-3.13.2.tgz"
    fake.write_bytes(b"not the package")
    with pytest.raises(SystemExit, match="integrity"):
        install.install(fake, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_viewer_config_points_at_the_proxy_and_files_stay_inside(tmp_path):
    from lib.monailabel_adapter import ohif_viewer

    config = ohif_viewer.app_config()
    assert 'window.location.origin + "/proxy/dicom/qido"' in config and '"routerBasename": "/viewer"' in config
    (tmp_path / "index.html").write_text("i")
    (tmp_path / "a.js").write_text("a")
    assert ohif_viewer.viewer_file("a.js", tmp_path) == tmp_path / "a.js"
    assert ohif_viewer.viewer_file("../etc/passwd", tmp_path) == tmp_path / "index.html"
    assert ohif_viewer.viewer_file("segmentation", tmp_path) == tmp_path / "index.html"


def test_the_data_source_name_names_the_pacs_without_its_credentials(monkeypatch):
    from lib.monailabel_adapter import ohif_viewer
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", "http://orthanc:secret@pacs.example:8042/dicom-web/")
    name = ohif_viewer.pacs_name()
    assert "http://pacs.example:8042/dicom-web " in name and "secret" not in name and "orthanc" not in name
    assert f'"friendlyName": "{name}"' in ohif_viewer.app_config()
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)  # app-config.js is public: no address
    name = ohif_viewer.pacs_name()
    assert "pacs.example" not in name and "8042" not in name and "PACS" in name
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", False)
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", "/data/studies")
    assert ohif_viewer.pacs_name() == "MRAnnotator PACS (through the server)"


def _source(uid: str, z: float) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID, ds.ImagePositionPatient = uid, [0.0, 0.0, z]
    return ds


def _labelmap_seg(frames: np.ndarray, refs: list[str], zs: list[float]) -> Dataset:
    seg = Dataset()
    seg.file_meta = Dataset()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.Rows, seg.Columns, seg.NumberOfFrames = frames.shape[1], frames.shape[2], len(frames)
    seg.SamplesPerPixel, seg.PhotometricInterpretation, seg.PixelRepresentation = 1, "MONOCHROME2", 0
    seg.BitsAllocated = seg.BitsStored = 8
    seg.HighBit = 7
    seg.PixelData = frames.astype(np.uint8).tobytes()
    items = []
    for ref, z in zip(refs, zs, strict=True):
        source, derivation, position, item = Dataset(), Dataset(), Dataset(), Dataset()
        source.ReferencedSOPInstanceUID = ref
        derivation.SourceImageSequence = [source]
        position.ImagePositionPatient = [0.0, 0.0, z]
        item.DerivationImageSequence, item.PlanePositionSequence = [derivation], [position]
        items.append(item)
    seg.PerFrameFunctionalGroupsSequence = items
    return seg


def test_labelmap_frames_go_on_the_slice_they_reference_and_must_sit_there():
    ordered = [_source(f"1.{k}", 5.0 * k) for k in range(4)]
    frames = np.zeros((2, 3, 3), np.uint8)
    frames[0, 0, 0], frames[1, 2, 2], frames[1, 1, 1] = 1, 2, 1
    pixels = labelmap_pixels(_labelmap_seg(frames, ["1.3", "1.1"], [15.0, 5.0]), ordered, [1, 2])
    assert pixels.shape == (4, 3, 3, 2)
    assert pixels[3, 0, 0, 0] == 1 and pixels[1, 1, 1, 0] == 1 and pixels[1, 2, 2, 1] == 1
    assert pixels.sum() == 3
    with pytest.raises(ValueError, match="mm from the instance"):  # frame content says slice 0, reference slice 3
        labelmap_pixels(_labelmap_seg(frames[:1], ["1.3"], [0.0]), ordered, [1])
    with pytest.raises(ValueError, match="not in the series"):
        labelmap_pixels(_labelmap_seg(frames[:1], ["9.9"], [0.0]), ordered, [1])
