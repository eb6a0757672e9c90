"""The installed environment imports every face of the product (a fresh interpreter each)."""

import subprocess
import sys

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
