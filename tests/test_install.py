"""The installed environment imports every face of the product; a wheel installed not editable runs the demo."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "statement",
    [
        # MONAI Label 0.8.5 + pydicom 3: needs the compatibility hook (pydicom_seg imports a removed module)
        "import monailabel.app; from monailabel.interfaces.app import MONAILabelApp",
        "import pydicom, pydicom_seg; assert int(pydicom.__version__.split('.')[0]) >= 3",
        "from monai.deploy.operators import DICOMSegmentationWriterOperator, DICOMDataLoaderOperator",
        "import highdicom, nnunetv2, SimpleITK, nibabel, mrannotator",
    ],
)
def test_fresh_interpreter_imports(statement):
    r = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_holoscan_packager_pinned():
    from importlib.metadata import version

    # holoscan-cli 4.3+ has no `package` command for MAPs
    assert version("holoscan-cli") == "4.2.0"
    assert version("holoscan-cu13") == "4.2.0"


def test_wheel_installed_not_editable_runs_the_demo_on_its_packaged_weights(repo_root, tmp_path):
    """`pip install` of the built wheel (not editable) into a fresh venv, then `mrannotator demo` from there.

    To stay offline and fast the venv gets the test environment's dependencies through a path file (the wheel
    itself is installed with --no-deps), and runs with no PYTHONPATH, outside the checkout: the package, its
    demo weights and the pydicom compatibility hook all come from the installed wheel.
    """
    import json
    import os
    import sysconfig
    import time

    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(repo_root)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(wheels.glob("mrannotator-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MRANNOTATOR_DEMO_WEIGHTS")}
    r = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # then the dependencies (after: pip would take the test environment's own mrannotator as installed), as a
    # plain path line, after the venv's own site-packages; the test environment's .pth files are not run
    (site / "00_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert (site / "mrannotator-pydicom-compat.pth").is_file()  # the wheel's data file, installed in the venv

    env["MRANNOTATOR_HOME"] = str(tmp_path / "home")  # no installed official weights
    probe = ("import mrannotator, pydicom_seg; from mrannotator.weights import demo_weights_dir; "
             "print(mrannotator.__file__); print(demo_weights_dir())")
    r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    package_file, demo_dir = r.stdout.split()
    assert Path(package_file).is_relative_to(site) and Path(demo_dir).is_relative_to(site)
    assert not Path(demo_dir).is_symlink() and (Path(demo_dir) / "Dataset001_Abdomen").is_dir()

    t0 = time.perf_counter()
    r = subprocess.run([str(venv / "bin" / "mrannotator"), "demo", "-o", str(tmp_path / "demo"), "--device", "cpu",
                        "--quiet"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["weights"]["source"] == "demo" and Path(report["weights"]["root"]).is_relative_to(site)
    assert len(report["cases"]) == 6 and report["mean_dice"] > 0.8, r.stdout
    print(f"wheel demo: {seconds:.1f} s, mean Dice {report['mean_dice']}")  # shown with pytest -s
