"""Oversize and forged images and labels (server uploads, stored studies, CLI): refused from the header.

A gzip NIfTI of 1000x1000x1000 zeros is under a megabyte; a 370-byte NIfTI can declare 2 GB of
voxels. Each is refused with 413 (over a cap) or 422 (forged or corrupt) or exit code 2, with a
message naming the problem, before its voxels are decompressed: the server's peak RSS (sampled with
psutil on its PID) and the CLI's (wait4) must not grow by 200 MB. Nothing is stored.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from server_support import start_server, stop_server

from mrannotator.errors import InputError
from mrannotator.imageio import load_image
from mrannotator.limits import TooLargeError
from mrannotator.phantoms import make_phantom

pytestmark = pytest.mark.timeout(600)

RSS_GROWTH_LIMIT = 200 * 2**20
_ZEROS = bytes(1 << 24)


def nifti_header(shape, dtype=np.uint8) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    return header.binaryblock + b"\0" * 4  # 352 bytes: vox_offset


def gzip_zeros_nifti(path: Path, shape, data_bytes: int | None = None) -> Path:
    """A gzip NIfTI of zeros; ``data_bytes`` other than the declared size makes a lying header."""
    n = int(np.prod(shape)) if data_bytes is None else data_bytes
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    with open(path, "wb") as f:
        f.write(comp.compress(nifti_header(shape)))
        for _ in range(n // len(_ZEROS)):
            f.write(comp.compress(_ZEROS))
        f.write(comp.compress(bytes(n % len(_ZEROS))))
        f.write(comp.flush())
    return path


class PeakRSS:
    """Samples a process's RSS every 5 ms while in the block; ``growth`` = peak minus the RSS at entry."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        time.sleep(0.2)  # the response is sent before a late allocation would show
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.base


def listening_pid(proc: subprocess.Popen, port: int) -> int:
    """The process (the launcher or a child of it) that serves ``port``."""
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in p.net_connections("tcp")):
            return p.pid
    raise AssertionError(f"no process of {proc.pid} listens on {port}")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    return {
        "gzip_1000_cubed": gzip_zeros_nifti(d / "bomb.nii.gz", (1000, 1000, 1000)),
        # under the caps (216 M voxels) but not the image's shape: refused before decompression
        "gzip_600_cubed": gzip_zeros_nifti(d / "big_label.nii.gz", (600, 600, 600)),
        # declares 8x8x8 but its stream holds 300 MB
        "lying_gzip": gzip_zeros_nifti(d / "lying.nii.gz", (8, 8, 8), data_bytes=300 * 2**20),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_weights, bombs):
    root = tmp_path_factory.mktemp("limits")
    studies = root / "studies"
    studies.mkdir()
    ph = make_phantom("knee", seed=11)
    nib.save(ph.image, studies / "knee.nii.gz")
    nib.save(ph.labels, root / "knee_label.nii.gz")
    (studies / "stored_bomb.nii.gz").write_bytes(bombs["gzip_1000_cubed"].read_bytes())  # copied in by hand
    srv = start_server(root, studies, demo_weights)
    srv.pid = listening_pid(srv.proc, srv.port)
    srv.studies = studies
    yield srv
    stop_server(srv)


def _stored_files(server) -> set[str]:
    return {str(p.relative_to(server.studies)) for p in server.studies.rglob("*") if p.is_file()}


def _upload_image(server, path: Path, image_id: str):
    with open(path, "rb") as f:
        return requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                            files={"file": (path.name, f)}, timeout=120)


def _upload_label(server, path: Path, image_id: str = "knee"):
    with open(path, "rb") as f:
        return requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
                            files={"label": (path.name, f)}, timeout=120)


# ------------------------------------------------------------------------------------------- server
@pytest.mark.parametrize("what, upload, file, status, words", [
    ("image bomb", _upload_image, "gzip_1000_cubed", 413, "1,000,000,000 voxels"),
    ("label bomb", _upload_label, "gzip_1000_cubed", 413, "1,000,000,000 voxels"),
    ("label too big for its image", _upload_label, "gzip_600_cubed", 422, "shape"),
    ("gzip holding more than its header says", _upload_image, "lying_gzip", 422, "more than"),
])
def test_bombs_are_refused_before_decompression(server, bombs, what, upload, file, status, words):
    before = _stored_files(server)
    args = (server, bombs[file], "bomb") if upload is _upload_image else (server, bombs[file])
    with PeakRSS(server.pid) as rss:
        r = upload(*args)
    print(f"{what}: HTTP {r.status_code}, server RSS +{rss.growth / 2**20:.1f} MB (peak {rss.peak / 2**20:.0f} MB)")
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.text
    assert rss.growth < RSS_GROWTH_LIMIT, f"{what}: server RSS grew {rss.growth / 2**20:.0f} MB"
    assert _stored_files(server) == before
    assert "bomb" not in requests.get(f"{server.url}/datastore/", params={"output": "all"}).json()["objects"]


def test_a_stored_bomb_is_refused_at_infer(server):
    with PeakRSS(server.pid) as rss:
        r = requests.post(f"{server.url}/infer/mrannotator_shoulderknee", params={"image": "stored_bomb",
                                                                                   "output": "json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"], r.text
    assert rss.growth < RSS_GROWTH_LIMIT


def test_forged_truncated_and_corrupt_files_get_422(server, tmp_path):
    forged = tmp_path / "forged.nii"  # 370 bytes whose header declares 200^3 int16 (16 MB)
    forged.write_bytes(nifti_header((200, 200, 200), np.int16) + bytes(18))
    corrupt = tmp_path / "corrupt.nii.gz"
    good = gzip.compress(nifti_header((64, 64, 64)) + bytes(64**3))
    corrupt.write_bytes(good[: len(good) // 2])
    before = _stored_files(server)
    for path, words in ((forged, "truncated"), (corrupt, "gzip")):
        r = _upload_image(server, path, "broken")
        assert r.status_code == 422 and words in r.json()["detail"], r.text
        r = _upload_label(server, path)
        assert r.status_code == 422, r.text
    assert _stored_files(server) == before


def test_a_good_label_is_still_stored_byte_for_byte(server):
    label = server.root / "knee_label.nii.gz"
    r = _upload_label(server, label)
    assert r.status_code == 200, r.text
    assert (server.studies / "labels" / "final" / "knee.nii.gz").read_bytes() == label.read_bytes()


# ------------------------------------------------------------------------------------------- CLI / API
def _cli(args: list[str]) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS (MB, sampled every 5 ms) of ``mrannotator`` run as a child process.

    (Not wait4's ru_maxrss: Linux carries the parent's high-water mark over a vfork + exec.)"""
    p = subprocess.Popen([sys.executable, "-m", "mrannotator.cli", *args], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL)
    child, peak = psutil.Process(p.pid), 0

    def sample():
        nonlocal peak
        while p.poll() is None:
            try:
                if "mrannotator.cli" in child.cmdline():  # after exec: the CLI's own memory
                    peak = max(peak, child.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = p.stderr.read().decode()
    p.wait()
    sampler.join()
    return p.returncode, err, peak / 2**20


def test_cli_header_bomb_exits_2_with_a_message_in_bounded_memory(tmp_path, bombs):
    header_bomb = tmp_path / "header_bomb.nii"  # 370 bytes claiming 1000^3 int16
    header_bomb.write_bytes(nifti_header((1000, 1000, 1000), np.int16) + bytes(18))
    assert header_bomb.stat().st_size == 370
    for path in (header_bomb, bombs["gzip_1000_cubed"]):
        code, err, peak_mb = _cli(["segment", "-i", str(path), "-o", str(tmp_path / "out"), "--quiet"])
        print(f"{path.name}: exit {code}, peak RSS {peak_mb:.0f} MB: {err.strip()}")
        assert code == 2
        assert "1,000,000,000 voxels" in err and "limit" in err and "Traceback" not in err
        assert peak_mb < 200
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_api_reader_refuses_from_the_header(tmp_path, bombs):
    with pytest.raises(TooLargeError, match="MRANNOTATOR_MAX_VOXELS"):
        load_image(bombs["gzip_1000_cubed"])
    with pytest.raises(InputError, match="more than"):
        load_image(bombs["lying_gzip"])
    truncated = tmp_path / "t.nii"
    truncated.write_bytes(nifti_header((64, 64, 64), np.int16) + bytes(1000))
    with pytest.raises(InputError, match="truncated"):
        load_image(truncated)


def test_caps_follow_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.int16), np.eye(4)), path)
    assert load_image(path).shape == (40, 40, 40)
    monkeypatch.setenv("MRANNOTATOR_MAX_VOXELS", str(39**3))
    with pytest.raises(TooLargeError, match="64,000 voxels"):
        load_image(path)


def test_cli_checks_the_output_folder_before_inference(tmp_path, real_mr):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a folder")
    code, err, _ = _cli(["segment", "-i", str(real_mr), "-o", str(in_the_way / "out")])
    assert code == 2 and "output folder" in err and "Traceback" not in err
    assert "loading models" not in err  # refused before minutes of inference

    out = tmp_path / "out"
    (out / "example_mr_sm_structures.json").mkdir(parents=True)  # a directory where the JSON goes
    code, err, _ = _cli(["segment", "-i", str(real_mr), "-o", str(out)])
    assert code == 2 and "example_mr_sm_structures.json" in err and "Traceback" not in err
    assert "loading models" not in err
    assert not (out / "example_mr_sm_seg.nii.gz").exists()  # nothing half-written
