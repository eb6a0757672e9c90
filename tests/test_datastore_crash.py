"""The local datastore under SIGKILL and hostile uploads: nothing lost, nothing half-written, no image
swapped under its label.

Kill test: a real server (demo weights, CPU) over a studies folder of small knee phantoms, each with a
final label. The server is started with ``MRANNOTATOR_DATASTORE_KILL_AT=POINT@N`` (lib/faults.py), at
seeded points of label saves, image uploads and index rewrites, and driven with uploads until it kills
itself. At every restart: the server comes up; every label is byte for byte the last confirmed content
or the one being written (never 0 bytes or a part); the index lists every image whose upload was
answered (and the one in flight only if its file is complete); no temporary file is left. On some
restarts the test itself damages the index first (empty, cut in half, garbage, deleted: what MONAI
Label's in-place rewrite left after a kill): the server starts, warns, and rebuilds it from the files.

Integrity: ids resolve only inside the datastore (an id naming a file in the server's working
directory is 404, and infer on a stored id never reads a same-named file there); an upload under a
labelled id is 409 unless ``params={"overwrite": true}``; an upload whose file name is a path is 400.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing.server_support import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

SEED = int(os.environ.get("MRANNOTATOR_KILL_SEED", "20261204"))
POINTS = [f"{what}:{stage}" for what in ("label", "image") for stage in ("start", "partial", "written", "replaced")]
POINTS += [f"index:{stage}" for stage in ("partial", "written", "replaced")]
# The suite kills at every point once (11 kills, each index damage once); the study behind issue 20's figures
# kills at every point twice: MRANNOTATOR_KILLS=22 (bench/README.md, "Kill study").
KILLS = int(os.environ.get("MRANNOTATOR_KILLS", str(len(POINTS))))
CONF = {"regions": "knee"}
DAMAGE = ("empty", "half", "garbage", "deleted")


def _nifti_bytes(img: nib.Nifti1Image) -> bytes:
    return gzip.compress(img.to_bytes(), mtime=0)


def _label_bytes(base: nib.Nifti1Image, version: int) -> bytes:
    """A distinct, valid label for the image: a slab cleared, and the version in the header."""
    data = np.asanyarray(base.dataobj).astype(np.uint8).copy()
    data[:, :, version % data.shape[2]] = 0
    img = nib.Nifti1Image(data, base.affine)
    img.set_qform(base.affine, code=1)
    img.set_sform(base.affine, code=1)
    img.header["descrip"] = f"version {version}".encode()
    return _nifti_bytes(img)


@dataclass
class Expected:
    """What the studies folder must hold: confirmed contents, and the write in flight when killed."""
    images: dict[str, bytes] = field(default_factory=dict)
    labels: dict[str, bytes] = field(default_factory=dict)
    inflight: tuple[str, str, bytes] | None = None  # (kind, id, new content)
    outcomes: dict[str, int] = field(default_factory=lambda: {"old": 0, "new": 0})
    leftovers: int = 0


def _get(server, path: str, **params) -> requests.Response:
    return requests.get(f"{server.url}{path}", params=params, timeout=60)


def _check_restart(server, studies: Path, expected: Expected) -> None:
    """Every image listed, every label old or new content, no temporary file: then the in-flight write
    is settled (as found) into the expected state."""
    listed = set(_get(server, "/datastore/", output="all").json()["objects"])
    kind, ident, new = expected.inflight or ("", "", b"")
    assert set(expected.images) <= listed, f"images missing from the index: {set(expected.images) - listed}"
    assert listed <= set(expected.images) | ({ident} if kind == "image" else set()), listed
    on_disk = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert set(on_disk) == listed
    if kind == "image":
        found = ident in listed and _get(server, "/datastore/image", image=ident).content
        assert found in (False, new), f"image {ident} is neither absent nor the uploaded file"
        expected.outcomes["new" if found else "old"] += 1
        if found:
            expected.images[ident] = new
    for image, content in expected.labels.items():
        r = _get(server, "/datastore/label", label=image, tag="final")
        assert r.status_code == 200, (image, r.status_code, r.text)
        allowed = {content, new} if (kind, ident) == ("label", image) else {content}
        assert r.content in allowed, f"label {image}: {len(r.content)} bytes, neither the old nor the new content"
        if (kind, ident) == ("label", image):
            expected.outcomes["new" if r.content == new and new != content else "old"] += 1
            expected.labels[image] = r.content
    assert not [p for p in studies.rglob("*") if ".tmp-" in p.name], "temporary files left after the start"
    expected.inflight = None


def _damage_index(studies: Path, how: str) -> None:
    index = studies / "datastore_v2.json"
    text = index.read_bytes()
    if how == "deleted":
        index.unlink()
    else:
        index.write_bytes({"empty": b"", "half": text[: len(text) // 2], "garbage": b"\x00\xff{[" * 50}[how])


def _drive_until_killed(server, point: str, rng: random.Random, expected: Expected, phantoms: dict) -> None:
    """Uploads of the point's kind (labels, images, or both for index points) until the server dies."""
    for _ in range(8):
        kind = point.split(":")[0]
        if kind == "index":
            kind = rng.choice(["label", "image"])
        if kind == "label":
            image = rng.choice(sorted(expected.labels))
            new = _label_bytes(phantoms[image], rng.randrange(10**6))
            path, query, files = "label", {"image": image, "tag": "final"}, {"label": ("label.nii.gz", new)}
        else:
            image = f"new{len(expected.images):03d}"
            new = _nifti_bytes(make_phantom("knee", seed=rng.randrange(10**6)).image)
            path, query, files = "image", {"image": image}, {"file": (f"{image}.nii.gz", new)}
        expected.inflight = (kind, image, new)
        try:
            r = requests.put(f"{server.url}/datastore/{path}", params=query, files=files, timeout=60)
        except requests.ConnectionError:
            break
        assert r.status_code == 200, r.text
        (expected.labels if kind == "label" else expected.images)[image] = new
        expected.inflight = None
    else:
        raise AssertionError(f"the server was not killed at {point} within 8 uploads")
    assert server.proc.wait(30) == -9, "the server died, but not by the fault hook's SIGKILL"
    assert f"killing this server process at '{point.split('@')[0]}'" in server.log_text()


def test_sigkill_during_label_saves_and_index_rewrites(tmp_path, demo_weights):
    rng = random.Random(SEED)
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    expected, phantoms = Expected(), {}
    for n in range(3):
        ph = make_phantom("knee", seed=700 + n)
        name = f"knee{n}"
        phantoms[name] = ph.labels
        expected.images[name] = _nifti_bytes(ph.image)
        expected.labels[name] = _label_bytes(ph.labels, 0)
        (studies / f"{name}.nii.gz").write_bytes(expected.images[name])
        (studies / "labels" / "final" / f"{name}.nii.gz").write_bytes(expected.labels[name])
    rounds = -(-KILLS // len(POINTS))
    plan = []
    for _ in range(rounds):  # every point once per round, in a seeded order
        plan += rng.sample(POINTS, len(POINTS))
    plan = [f"{p}@{rng.randint(1, 2)}" for p in plan[:KILLS]]
    damaged = min(KILLS, max(len(DAMAGE), KILLS * 6 // 22))  # each kind of damage at least once
    damage = {k: DAMAGE[i % len(DAMAGE)] for i, k in enumerate(sorted(rng.sample(range(1, KILLS + 1), damaged)))}
    print(f"seed {SEED}; kill plan {plan}; index damaged before restarts {damage}")
    t0, starts = time.time(), 0
    for k, point in enumerate([*plan, None]):
        leftovers = [p for p in studies.rglob("*") if ".tmp-" in p.name]
        expected.leftovers += len(leftovers)
        if k in damage:
            _damage_index(studies, damage[k])
        env = {"MRANNOTATOR_DATASTORE_KILL_AT": point} if point else {}
        server = start_server(tmp_path, studies, demo_weights, conf=CONF, env=env)
        starts += 1
        try:
            if k in damage and damage[k] != "deleted":
                assert "cannot be read" in server.log_text() and "rebuilt from the image and label files" in \
                    server.log_text()
            if k:
                _check_restart(server, studies, expected)
            if point:
                _drive_until_killed(server, point, rng, expected, phantoms)
        finally:
            stop_server(server)
    summary = {"seed": SEED, "kills": len(plan), "starts_all_up": starts, "in_flight_outcomes": expected.outcomes,
               "temporary_files_after_kills": expected.leftovers, "seconds": round(time.time() - t0)}
    print(summary)
    (tmp_path / "summary.json").write_text(json.dumps(summary))  # the figures, kept with the test's folder
    assert sum(expected.outcomes.values()) == len(plan)


# ================================================================== integrity (one server)
@pytest.fixture(scope="module")
def integrity_server(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("integrity")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    ph = make_phantom("knee", seed=811)
    nib.save(ph.image, studies / "knee.nii.gz")
    nib.save(ph.labels, studies / "labels" / "final" / "knee.nii.gz")
    other = make_phantom("knee", seed=812)
    cwd = root / "cwd"  # the server's working directory: NIfTIs named like a stored id and like no id
    cwd.mkdir()
    decoy = make_phantom("abdomen", seed=813).image  # another shape: a label made from it shows
    for name in ("knee", "stray_case"):
        (cwd / name).write_bytes(_nifti_bytes(decoy))
    srv = start_server(root, studies, demo_weights, conf=CONF, cwd=cwd)
    yield {"server": srv, "studies": studies, "phantom": ph, "other": other, "decoy": decoy}
    stop_server(srv)


def _put_image(url: str, name: str, content: bytes, **params) -> requests.Response:
    query = {k: v for k, v in params.items() if k != "params"}
    data = {"params": json.dumps(params["params"])} if "params" in params else None
    return requests.put(f"{url}/datastore/image", params=query, data=data, files={"file": (name, content)}, timeout=60)


def test_ids_resolve_only_inside_the_datastore(integrity_server):
    url = integrity_server["server"].url
    stray = {"image": "stray_case"}
    for path, params in (("/datastore/image", stray), ("/datastore/image/info", stray),
                         ("/datastore/label", {"label": "stray_case", "tag": "final"})):
        r = requests.get(f"{url}{path}", params=params, timeout=30)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
    r = requests.post(f"{url}/infer/mrannotator", params={"image": "stray_case"}, timeout=60)
    assert r.status_code == 404 and "stray_case" in r.text
    # "knee" is stored AND names a different image in the server's cwd: the stored one is segmented
    from requests_toolbelt.multipart import decoder

    r = requests.post(f"{url}/infer/mrannotator", params={"image": "knee"}, timeout=300)
    assert r.status_code == 200, r.text
    blob = next(p.content for p in decoder.MultipartDecoder.from_response(r).parts
                if b"image" in p.headers[b"Content-Disposition"])
    label = nib.Nifti1Image.from_bytes(gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob)
    stored, decoy = integrity_server["phantom"].image, integrity_server["decoy"]
    assert decoy.shape != stored.shape
    assert label.shape == stored.shape and np.allclose(label.affine, stored.affine, atol=1e-3)


def test_a_labelled_image_is_not_replaced_without_overwrite(integrity_server):
    url, studies = integrity_server["server"].url, integrity_server["studies"]
    before_image = (studies / "knee.nii.gz").read_bytes()
    before_label = (studies / "labels" / "final" / "knee.nii.gz").read_bytes()
    other = _nifti_bytes(integrity_server["other"].image)
    for r in (_put_image(url, "x.nii.gz", other, image="knee"), _put_image(url, "knee.nii.gz", other)):
        assert r.status_code == 409 and "overwrite" in r.text, (r.status_code, r.text)
    assert (studies / "knee.nii.gz").read_bytes() == before_image
    assert (studies / "labels" / "final" / "knee.nii.gz").read_bytes() == before_label
    r = _put_image(url, "x.nii.gz", other, image="knee", params={"overwrite": "yes"})
    assert r.status_code == 400 and "overwrite" in r.text
    # an unlabelled id may be replaced; a labelled one with overwrite: the image changes, its labels go
    assert _put_image(url, "fresh.nii.gz", other).status_code == 200
    assert _put_image(url, "fresh.nii.gz", before_image).status_code == 200
    r = _put_image(url, "x.nii.gz", other, image="knee", params={"overwrite": True})
    assert r.status_code == 200, r.text
    assert (studies / "knee.nii.gz").read_bytes() == other
    assert not (studies / "labels" / "final" / "knee.nii.gz").exists()
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert objects["knee"]["labels"] == {} and "overwrite" not in objects["knee"]["image"]["info"]


@pytest.mark.parametrize("name", ["studies/fresh.nii.gz", "../fresh.nii.gz", "/tmp/fresh.nii.gz",
                                  "a\\..\\fresh.nii.gz", ".hidden.nii.gz"])
def test_a_path_like_upload_name_is_refused(integrity_server, name):
    url, studies = integrity_server["server"].url, integrity_server["studies"]
    before = sorted(p.name for p in studies.rglob("*"))
    content = _nifti_bytes(integrity_server["other"].image)
    r = _put_image(url, name, content)
    assert r.status_code == 400 and "file name" in r.text, (r.status_code, r.text)
    assert sorted(p.name for p in studies.rglob("*")) == before
    # with image=<id> the name only gives the file type: clients send their local path (monailabel.client, 3D
    # Slicer); such an upload is judged on its content (here another image's grid: 422), never on its name
    r = _put_image(url, name, content, image="fresh")
    assert "file name" not in r.text, (r.status_code, r.text)
    r = requests.put(f"{url}/datastore/label", params={"image": "knee", "tag": "final"},
                     files={"label": (name, io.BytesIO(content))}, timeout=60)
    assert "file name" not in r.text and r.status_code in (200, 422), (r.status_code, r.text)
    assert not [p for p in studies.parent.rglob("fresh*") if studies not in p.parents]
