"""Package the MRAnnotator MONAI Deploy app as a MAP with `monai-deploy package` (holoscan-cli 4.2.0).

    python packaging/package.py [-m MODELS] [-t mrannotator:0.1.0] [--stage build/map] [extra packager args]

It stages what the packager copies, then runs, from the stage:

    monai-deploy package STAGE/app -c app.yaml --platform x86_64 -t TAG -m STAGE/models \
        --source packaging/artifacts.json

- STAGE/app = operators/ + the mrannotator engine package (src/mrannotator), so the image imports the
  engine from the app folder (`--add` would put every engine subfolder on PYTHONPATH, where
  mrannotator/imageio.py would shadow the `imageio` package).
- STAGE/models = only the DatasetXXX_Name model folders of MODELS (default: the demo weights). The
  packager treats a models folder holding any plain file (models/demo/README.md) as one model and
  copies it whole next to its subfolders, which would give the app every model twice.
- --source packaging/artifacts.json: the packager's manifest for holoscan 4.2.0 (base image
  nvcr.io/nvidia/cuda:13.0.0-runtime-ubuntu24.04), so nothing is fetched from GitHub.

Building the image itself needs Docker with buildx and access to nvcr.io; see the README.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# demo_weights: the engine's packaged demo weights (a link to models/demo); the MAP gets its models from -m
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "demo_weights")


def stage(models: Path, stage_dir: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "src"))
    from mrannotator.weights import find_model_folders

    folders = find_model_folders(models)  # refuses a folder without a complete nnU-Net model
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    app = stage_dir / "app"
    shutil.copytree(ROOT / "operators", app, ignore=IGNORE)
    shutil.copytree(ROOT / "src" / "mrannotator", app / "mrannotator", ignore=IGNORE)
    model_root = stage_dir / "models"
    model_root.mkdir(parents=True)
    for dataset in sorted({mf.path.parent for mf in folders}):
        shutil.copytree(dataset, model_root / dataset.name, ignore=IGNORE)
    return app, model_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--models", type=Path, default=ROOT / "models" / "demo", help="weights folder")
    p.add_argument("-t", "--tag", default="mrannotator:0.1.0")
    p.add_argument("--stage", type=Path, default=ROOT / "build" / "map", help="staging folder (replaced)")
    p.add_argument("--config", type=Path, default=ROOT / "app.yaml")
    args, extra = p.parse_known_args(argv)
    app, model_root = stage(args.models, args.stage)
    packager = Path(sys.executable).with_name("monai-deploy")
    cmd = [str(packager) if packager.exists() else "monai-deploy", "package", str(app), "-c", str(args.config),
           "--platform", "x86_64", "-t", args.tag, "-m", str(model_root),
           "--source", str(ROOT / "packaging" / "artifacts.json"), *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
