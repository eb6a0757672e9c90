"""The MONAI Label adapter's contract: every private upstream name we touch is listed, exists (a canary per
entry), and is touched nowhere else; another MONAI Label version stops the app with a clear message."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "mrannotator"
ADAPTER = APP_DIR / "lib" / "monailabel_adapter"


@pytest.fixture(scope="module")
def internals():
    return importlib.import_module("lib.monailabel_adapter.internals")  # apps/mrannotator: pytest's pythonpath


def _resolve(where: str):
    module, _, cls = where.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, cls) if cls else obj


def test_every_listed_internal_still_exists(internals):
    missing = []
    for where, name, _why in internals.INTERNALS:
        owner = _resolve(where)
        annotated = any(name in getattr(k, "__annotations__", {}) for k in getattr(owner, "__mro__", ()))
        if hasattr(owner, name) or annotated:
            continue
        # an instance attribute: the class's own code must still set it
        source = "".join(inspect.getsource(k) for k in inspect.getmro(owner) if k is not object)
        if not re.search(rf"self\.{re.escape(name)}\s*[:=]", source):
            missing.append(f"{where} {name}")
    assert not missing, f"upstream moved these; re-check the fixes that use them: {missing}"


def test_no_file_outside_the_adapter_touches_a_private_monailabel_name(internals):
    names = {name for _, name, _ in internals.INTERNALS if name.startswith("_") and name != "__call__"}
    names |= {"dependant", "get_ohif", "proxy_dicom"}
    pattern = re.compile(r"\.(" + "|".join(sorted(map(re.escape, names))) + r")\b")
    offenders = []
    for path in sorted(APP_DIR.rglob("*.py")):
        if ADAPTER in path.parents:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not re.search(r"self\._(datastore|infers|trainers|strategies)\b\s*=", code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_another_monailabel_version_stops_the_app_with_a_clear_message(tmp_path):
    code = (
        "import monailabel; monailabel.__version__ = '0.9.0'\n"
        "from main import MRAnnotatorApp\n"
        f"MRAnnotatorApp({str(APP_DIR)!r}, {str(tmp_path)!r}, {{}})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode != 0
    assert "made for MONAI Label 0.8.5, but 0.9.0 is installed" in r.stderr, r.stderr[-2000:]
    assert "Traceback" in r.stderr and "UnsupportedMonaiLabel" in r.stderr


def test_the_installed_monailabel_is_the_supported_one(internals):
    assert internals.check_version() == internals.SUPPORTED_MONAILABEL
