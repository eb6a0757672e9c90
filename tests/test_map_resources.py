"""The MAP's resource request against what was measured (bench/results, written by the benchmarks named there).

The figures are read from the benchmarks' JSON, not copied here: re-running a benchmark (or lowering the
request in app.yaml) re-checks the request. bench/README.md says how each figure was measured.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def quantity_mib(text: str) -> float:
    """A Kubernetes memory quantity (``6Gi``, ``5500Mi``, ``6G``) in MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T|)\s*", str(text))
    assert m, f"not a memory quantity: {text!r}"
    return float(m.group(1)) * UNITS[m.group(2)] / 2**20


def app_yaml_memory_mib() -> float:
    return quantity_mib(yaml.safe_load((ROOT / "app.yaml").read_text())["resources"]["memory"])


def test_quantity_parser():
    assert quantity_mib("6Gi") == 6144 and quantity_mib("5500Mi") == 5500 and quantity_mib("1G") == 10**9 / 2**20


def test_memory_request_is_above_the_measured_map_peak_on_a_3d_t1():
    record = json.loads((RESULTS / "map_memory.json").read_text())
    assert record["shape"] == [256, 256, 130]
    run = record["map"]
    peak = max(run["peak_rss_tree_mib"], run["ru_maxrss_mib"], run["peak_pss_tree_mib"])
    assert peak > 500, f"implausible MAP peak {peak} MiB: was the run real?"
    assert app_yaml_memory_mib() > peak * 1.25, (app_yaml_memory_mib(), peak)


def test_memory_request_is_above_the_recorded_512x512x200_peak():
    """The engine's own rows of bench/memory.py (the CLI and the server, all four models) on 512 x 512 x 200."""
    record = json.loads((RESULTS / "memory.json").read_text())
    assert record["shape"] == [512, 512, 200]
    rows = record["rows"]
    peak = max(max(rows[k]["peak_rss_one_process_mib"], rows[k]["peak_pss_mib"])
               for k in ("engine_cli", "server_infer"))
    assert app_yaml_memory_mib() > peak, (app_yaml_memory_mib(), peak)


def test_map_refusal_costs_at_most_twice_the_cli_refusal():
    refusal = json.loads((RESULTS / "map_memory.json").read_text())["refusal"]
    assert refusal, "no refusal recorded"
    for name, faces in refusal.items():
        assert faces["CLI"]["exit"] == faces["MAP"]["exit"] == 2, name
        assert faces["MAP"]["wall_s_median"] <= 2 * faces["CLI"]["wall_s_median"], (name, faces)


def test_image_manifest_carries_the_app_yaml_request(tmp_path):
    """packaging/image.py writes pkg.json's resources from app.yaml (what a MAP runner reads)."""
    image = _packaging_image()

    models = tmp_path / "models"
    (models / "Dataset001_Abdomen").mkdir(parents=True)
    image.manifests(ROOT / "app.yaml", models, tmp_path / "map")
    pkg = json.loads((tmp_path / "map" / "pkg.json").read_text())
    app = json.loads((tmp_path / "map" / "app.json").read_text())
    assert quantity_mib(pkg["resources"]["memory"]) == app_yaml_memory_mib()
    assert app["environment"]["HOLOSCAN_CONFIG_PATH"] == "/var/holoscan/app.yaml"
    assert app["environment"]["HOLOSCAN_MODEL_PATH"] == pkg["modelRoot"]


def test_image_build_refuses_a_cpu_torch_with_pypi_torchvision(tmp_path):
    """torchvision's ops library from PyPI links PyPI's (CUDA) torch: with a +cpu torch, model loading fails
    ("operator torchvision::nms does not exist", measured on the built image); the wheels step says so first."""
    image = _packaging_image()

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    (wheels / "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    with pytest.raises(image.StepFailed, match=r"torchvision 0\.28\.0 is PyPI's CUDA build"):
        image.check_torch_pair(wheels)
    (wheels / "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl").rename(
        wheels / "torchvision-0.28.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    image.check_torch_pair(wheels)  # a +cpu pair is accepted
    for name in ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "torchvision-0.28.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"):
        (wheels / name).unlink()
    (wheels / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    (wheels / "torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    image.check_torch_pair(wheels)  # PyPI's pair (the default) is accepted


def test_image_carries_the_map_environment_and_app_yaml():
    image = _packaging_image()

    text = image.containerfile()
    for key in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH", "HOLOSCAN_WORKDIR",
                "HOLOSCAN_CONFIG_PATH", "HOLOSCAN_APP_MANIFEST_PATH", "HOLOSCAN_PKG_MANIFEST_PATH"):
        assert f"ENV {key}=" in text, key
    assert f"COPY app.yaml {image.ENV['HOLOSCAN_CONFIG_PATH']}" in text
    assert "--no-index" in text  # the image installs only the wheels built on the host


def _packaging_image():
    """packaging/image.py, loaded from its file (packaging/ is not a package)."""
    spec = importlib.util.spec_from_file_location("packaging_image", ROOT / "packaging" / "image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
