"""Debian's chromium for the OHIF browser tests: what they need installed, and how it is launched.

``why_skip(*modules)`` names the first missing piece (chromium, the OHIF build the server serves at /viewer/,
Playwright, Orthanc, or one of ``modules``), or None; with CI set a skip fails the run (tests/conftest.py).
``launch(playwright)`` starts chromium headless with SwiftShader for OHIF's WebGL (no GPU here);
``open_page()`` is a context manager for the usual case: a 1600 x 1000 page of a chromium of its own, closed
on exit (Playwright objects are read inside the block: its event loop ends with it).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

from . import orthanc_support

CHROMIUM = Path("/usr/bin/chromium")
VIEWER = Path(__file__).resolve().parents[3] / "apps" / "mrannotator" / "ohif_viewer" / "index.html"
ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]


def why_skip(*modules: str) -> str | None:
    if not CHROMIUM.is_file():
        return f"Debian's chromium is not installed ({CHROMIUM}; apt-get install -y chromium)"
    if not VIEWER.is_file():
        return f"the OHIF viewer is not installed ({VIEWER}): scripts/install.sh or python scripts/install_ohif.py"
    for name in ("playwright.sync_api", *modules):
        try:
            importlib.import_module(name)
        except ImportError:
            return f"{name.split('.')[0]} is not installed (pip install -e '.[dev]'; no browser download is needed)"
    return orthanc_support.missing()


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


@contextmanager
def open_page(width: int = 1600, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
