"""Install the current OHIF viewer (npm ``@ohif/app``, its built ``dist``) for the server to serve at /viewer/.

    python scripts/install_ohif.py [--tarball ohif-app-3.13.2.tgz]

Without ``--tarball`` the package is fetched once with ``npm pack`` (npm checks it against the registry's
integrity); either way its SHA-512 must equal the pinned one below. The ``dist`` folder is unpacked into
``apps/mrannotator/ohif_viewer/`` (git-ignored), with the one thing a deployment under a sub-path needs
that the prebuilt bundle fixes at "/": its webpack public path and the absolute URLs in ``index.html`` and the CSS
become ``/viewer/``. Nothing else is changed; ``app-config.js`` is written by the server at request time
(lib/monailabel_adapter/ohif_viewer.py). The folder is replaced atomically (unpacked next to it, renamed).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE, VERSION = "@ohif/app", "3.13.2"
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
MOUNT = "/viewer/"
ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "apps" / "mrannotator" / "ohif_viewer"
PUBLIC_PATH = re.compile(rb'__webpack_require__\.p = "/";')


def integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not installed: apt-get install npm (or pass --tarball)")
    out = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(workdir)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"npm pack {PACKAGE}@{VERSION} failed:\n{out.stderr[-2000:]}")
    return workdir / out.stdout.strip().splitlines()[-1]


def rewrite(dist: Path) -> int:
    """Point the prebuilt bundle at MOUNT; returns how many webpack runtimes were re-pointed."""
    index = dist / "index.html"
    html = index.read_text()
    if 'window.PUBLIC_URL="/"' not in html:
        raise SystemExit(f"{index}: no window.PUBLIC_URL=\"/\"; this OHIF build is not the one pinned")
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{MOUNT}"')
    html = re.sub(r'(src|href)="/(?!/)', rf'\1="{MOUNT}', html)
    index.write_text(html)
    runtimes = 0
    for js in dist.glob("*.js"):
        data = js.read_bytes()
        new, n = PUBLIC_PATH.subn(f'__webpack_require__.p = "{MOUNT}";'.encode(), data)
        if n:
            js.write_bytes(new)
            runtimes += n
    for css in dist.glob("*.css"):  # fonts: url(/x.woff2)
        css.write_text(re.sub(r"url\(/(?!/)", f"url({MOUNT}", css.read_text()))
    if runtimes == 0:
        raise SystemExit("no webpack public path found in the bundle: this OHIF build is not the one pinned")
    return runtimes


def install(tarball: Path, target: Path = TARGET) -> Path:
    got = integrity(tarball)
    if got != INTEGRITY:
        raise SystemExit(f"{tarball}: integrity {got} is not the pinned {PACKAGE}@{VERSION} ({INTEGRITY})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ohif_viewer.", dir=target.parent))
    try:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(staging, members=members, filter="data")
        dist = staging / "package" / "dist"
        rewrite(dist)
        (dist / "app-config.js").unlink()  # served by the server, never a stale copy
        (dist / "OHIF_VERSION").write_text(f"{PACKAGE}@{VERSION}\n")
        os.sync()
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        dist.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help=f"a downloaded {PACKAGE}-{VERSION}.tgz (else npm pack)")
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args(argv)
    marker = args.target / "OHIF_VERSION"
    if marker.is_file() and marker.read_text().strip() == f"{PACKAGE}@{VERSION}" and not args.tarball:
        print(f"{PACKAGE}@{VERSION} already installed in {args.target}")
        return 0
    with tempfile.TemporaryDirectory() as work:
        tarball = args.tarball or fetch(Path(work))
        print(f"installed {PACKAGE}@{VERSION} in {install(tarball, args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
