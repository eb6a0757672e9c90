"""Build and run the MRAnnotator MAP image (CPU variant) with Debian's daemonless tools, no registry, no daemon.

    python packaging/image.py build [-m MODELS] [-t mrannotator:0.1.0-cpu] [--work build/image]
    python packaging/image.py run -i DICOM_DIR -o OUT [-t TAG] [--work build/image] [-e NAME=VALUE ...]

build, step by step (each step logs its command; a failure names the step):
  1 rootfs     mmdebstrap --variant=minbase bookworm (python3, python3-venv, ...) -> WORK/rootfs.tar
  2 base       buildah from scratch + add rootfs.tar + commit -> localhost/mrannotator-base:bookworm
  3 wheels     host pip (Python 3.11 = bookworm's) wheels of requirements-cpu.txt + --torch -> WORK/wheels;
               refused when torch is a +cpu build and torchvision is not (see DEFAULT_TORCH)
  4 stage      operators/ + src/mrannotator -> WORK/context/app, the model folders -> WORK/context/models,
               app.json / pkg.json (MAP manifest, from app.yaml) -> WORK/context/map
  5 image      buildah bud --isolation chroot --squash: venv from the wheels only (--no-index), app, models
  6 smoke      buildah run --isolation chroot: import torch, torchvision (nms), nnunetv2's trainer lookup, the app
run: buildah from TAG, then `buildah run --isolation chroot` with the input (read-only) and output folders
mounted at /var/holoscan/input and /var/holoscan/output (`podman run` cannot set rlimits in this sandbox).

Images and containers live in WORK/containers (buildah --root/--runroot), not in the machine's storage.
Steps 1-3 are skipped when their result exists (delete it to redo). The CUDA variant stays the
`monai-deploy package` build (packaging/package.py), which needs Docker + buildx and nvcr.io.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packaging"))
from package import stage  # noqa: E402

BASE = "localhost/mrannotator-base:bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates,libgomp1"
# torch and torchvision must be built for each other. nnU-Net's trainer lookup imports timm, which imports
# torchvision; PyPI's torchvision is a CUDA build whose ops library needs PyPI's (CUDA) torch, so with a +cpu torch
# it fails: "operator torchvision::nms does not exist" (measured here with torch 2.13.0+cpu, torchvision 0.28.0).
# A true CPU image needs both +cpu wheels from download.pytorch.org/whl/cpu (not reachable from this sandbox):
#   --torch "torch==2.13.0+cpu torchvision==0.28.0+cpu"
# The default is PyPI's build (the project venv's pair; CUDA libraries included, runs on CPU): a larger image.
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"
VENV = "/opt/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"
# The MAP's environment as holoscan-cli 4.2's Dockerfile template sets it (packager/templates/Dockerfile.jinja2,
# values from holoscan_cli.common.constants.DefaultValues), then the app's own settings.
ENV = {
    "HOLOSCAN_INPUT_PATH": "/var/holoscan/input",
    "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
    "HOLOSCAN_WORKDIR": "/var/holoscan",
    "HOLOSCAN_APPLICATION": "/opt/holoscan/app",
    "HOLOSCAN_TIMEOUT": "0",
    "HOLOSCAN_MODEL_PATH": "/opt/holoscan/models",
    "HOLOSCAN_DOCS_PATH": "/opt/holoscan/docs",
    "HOLOSCAN_CONFIG_PATH": "/var/holoscan/app.yaml",
    "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
    "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json",
    "HOLOSCAN_LOGS_PATH": "/var/holoscan/logs",
    "HOLOSCAN_VERSION": "4.2.0",  # holoscan-cu13 in requirements-cpu.txt
    "MRANNOTATOR_DEVICE": "cpu",
    "LD_LIBRARY_PATH": f"{SITE}/nvidia/cu13/lib",  # libcudart.so.13, which libholoscan_core links
    "PYTHONDONTWRITEBYTECODE": "1",
}
COMMAND = [f"{VENV}/bin/python3", "/opt/holoscan/app"]


class StepFailed(RuntimeError):
    pass


def sh(step: str, cmd: list[str], log: Path, capture: bool = False) -> str:
    """Run one command of a step into ``log`` (its stdout returned when ``capture``); raises StepFailed
    naming the step, the command and the log's tail."""
    print(f"[{step}] + {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n### [{step}] {shlex.join(cmd)}\n".encode())
        f.flush()
        r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else f, stderr=f if capture else subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise StepFailed(f"step '{step}' failed (exit {r.returncode}) after {time.perf_counter() - t0:.0f} s: "
                         f"{shlex.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    print(f"[{step}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return r.stdout.decode(errors="replace").strip() if capture else ""


def buildah(work: Path) -> list[str]:
    return ["buildah", "--root", str(work / "containers" / "storage"), "--runroot", str(work / "containers" / "run")]


def containerfile() -> str:
    env = "\n".join(f'ENV {k}="{v}"' for k, v in ENV.items())
    return f"""FROM {BASE}
COPY wheels /tmp/wheels
COPY requirements-cpu.txt /tmp/requirements-cpu.txt
RUN python3 -m venv {VENV} \\
 && {VENV}/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels -r /tmp/requirements-cpu.txt \\
 && rm -rf /tmp/wheels /tmp/requirements-cpu.txt \\
 && mkdir -p /var/holoscan/input /var/holoscan/output /var/holoscan/logs /opt/holoscan/docs
COPY app /opt/holoscan/app
COPY models /opt/holoscan/models
COPY map /etc/holoscan
COPY app.yaml /var/holoscan/app.yaml
{env}
WORKDIR /var/holoscan
ENTRYPOINT {json.dumps(COMMAND)}
"""


def manifests(config: Path, models: Path, dest: Path) -> None:
    """app.json and pkg.json as the MAP specification lays them out (from app.yaml)."""
    import yaml

    conf = yaml.safe_load(config.read_text())
    app = conf.get("application", {})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "app.json").write_text(json.dumps({
        "apiVersion": "1.0.0", "command": json.dumps(COMMAND), "environment": ENV, "sdk": "monai-deploy",
        "sdkVersion": "4.0.0", "version": app.get("version"), "workingDirectory": "/var/holoscan",
        "input": {"path": "input/", "formats": app.get("input-formats")},
        "output": {"path": "output/", "formats": app.get("output-formats")},
    }, indent=2))
    datasets = sorted(p.name for p in models.iterdir() if p.is_dir())
    (dest / "pkg.json").write_text(json.dumps({
        "apiVersion": "1.0.0", "applicationRoot": "/opt/holoscan/app", "modelRoot": "/opt/holoscan/models",
        "models": {d: f"/opt/holoscan/models/{d}" for d in datasets}, "resources": conf.get("resources", {}),
        "version": app.get("version"), "platformConfig": "x86_64-cpu",
    }, indent=2))


def check_torch_pair(wheels: Path) -> None:
    """A +cpu torch with a torchvision that is not +cpu cannot load torchvision's ops: refuse before building."""
    names = {w.name.split("-")[0]: w.name.split("-")[1] for w in wheels.glob("torch*.whl")}
    torch, vision = names.get("torch", ""), names.get("torchvision", "")
    if torch.endswith("+cpu") and vision and not vision.endswith("+cpu"):
        raise StepFailed(f"step '3 wheels': torch {torch} is a CPU build but torchvision {vision} is PyPI's CUDA build "
                         f"(its ops need PyPI's torch: 'operator torchvision::nms does not exist' at model loading). "
                         f"Give --torch 'torch==V+cpu torchvision==W+cpu' (download.pytorch.org/whl/cpu) or PyPI's "
                         f"pair (default '{DEFAULT_TORCH}'), and delete {wheels}")


SMOKE = ("import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); "
         "from nnunetv2.utilities.find_class_by_name import recursive_find_python_class as f; import nnunetv2, os; "
         "f(os.path.join(nnunetv2.__path__[0], 'training', 'nnUNetTrainer'), 'nnUNetTrainerNoMirroring', "
         "'nnunetv2.training.nnUNetTrainer'); import monai.deploy, holoscan; print('smoke ok', torch.__version__)")


def smoke(b: list[str], tag: str, log: Path) -> None:
    """The image's Python imports what model loading imports (torchvision's ops included) before it is called built."""
    ctr = sh("6 smoke", [*b, "from", tag], log, capture=True)
    try:
        sh("6 smoke", [*b, "run", "--isolation", "chroot", ctr, "--", f"{VENV}/bin/python3", "-c", SMOKE], log)
    finally:
        subprocess.run([*b, "rm", ctr], capture_output=True)


def build(args) -> int:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    b = buildah(work)
    rootfs = work / "rootfs.tar"
    if not rootfs.is_file():
        sh("1 rootfs", ["mmdebstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm",
                        str(rootfs), args.mirror], log)
    if subprocess.run([*b, "inspect", "--type", "image", BASE], capture_output=True).returncode != 0:
        ctr = sh("2 base", [*b, "from", "scratch"], log, capture=True)
        sh("2 base", [*b, "add", ctr, str(rootfs), "/"], log)
        sh("2 base", [*b, "config", "--cmd", "/bin/bash", ctr], log)
        sh("2 base", [*b, "commit", "--rm", ctr, BASE], log)
    context = work / "context"
    wheels = work / "wheels"
    if not (wheels / ".complete").is_file():
        sh("3 wheels", [sys.executable, "-m", "pip", "wheel", "-w", str(wheels), "-r",
                        str(ROOT / "packaging" / "requirements-cpu.txt"), *args.torch.split()], log)
        (wheels / ".complete").write_text(args.torch + "\n")
    check_torch_pair(wheels)
    stage(args.models, context)  # replaces context/ (app, models)
    manifests(args.config, context / "models", context / "map")
    shutil.copy2(args.config, context / "app.yaml")
    shutil.copy2(ROOT / "packaging" / "requirements-cpu.txt", context / "requirements-cpu.txt")
    with open(context / "requirements-cpu.txt", "a") as f:
        f.write("\n".join(args.torch.split()) + "\n")
    shutil.copytree(wheels, context / "wheels", copy_function=os.link)  # hard links: the context is a copy
    (context / "Containerfile").write_text(containerfile())
    sh("5 image", [*b, "bud", "--isolation", "chroot", "--squash", "--layers=false", "-f",
                   str(context / "Containerfile"), "-t", args.tag, str(context)], log)
    shutil.rmtree(context / "wheels")
    smoke(b, args.tag, log)
    size = sh("5 image", [*b, "images", "--format", "{{.Size}}", args.tag], log, capture=True)
    print(f"image {args.tag} built ({size}); storage {work / 'containers'}")
    return 0


def run(args) -> int:
    work = args.work.resolve()
    b = buildah(work)
    log = work / "run.log"
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctr = sh("run", [*b, "from", args.tag], log, capture=True)
    try:
        cmd = [*b, "run", "--isolation", "chroot", "-v", f"{args.input.resolve()}:/var/holoscan/input:ro",
               "-v", f"{out}:/var/holoscan/output"]
        for e in args.env:
            cmd += ["--env", e]
        print(f"[run] + {shlex.join([*cmd, ctr, '--', *COMMAND])}", flush=True)
        return subprocess.run([*cmd, ctr, "--", *COMMAND]).returncode
    finally:
        subprocess.run([*b, "rm", ctr], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    pb = sub.add_parser("build")
    pb.add_argument("-m", "--models", type=Path, default=ROOT / "models" / "demo")
    pb.add_argument("--config", type=Path, default=ROOT / "app.yaml")
    pb.add_argument("--torch", default=DEFAULT_TORCH,
                    help=f"torch and torchvision requirements, built for each other (default '{DEFAULT_TORCH}')")
    pb.add_argument("--mirror", default="http://deb.debian.org/debian")
    pr = sub.add_parser("run")
    pr.add_argument("-i", "--input", type=Path, required=True)
    pr.add_argument("-o", "--output", type=Path, required=True)
    pr.add_argument("-e", "--env", action="append", default=[], help="NAME=VALUE for the app")
    for q in (pb, pr):
        q.add_argument("-t", "--tag", default="localhost/mrannotator:0.1.0-cpu")
        q.add_argument("--work", type=Path, default=ROOT / "build" / "image")
    args = p.parse_args(argv)
    for tool in ("buildah", "mmdebstrap") if args.action == "build" else ("buildah",):
        if shutil.which(tool) is None:
            print(f"image.py: {tool} is missing (apt-get install -y buildah mmdebstrap)", file=sys.stderr)
            return 2
    try:
        return build(args) if args.action == "build" else run(args)
    except StepFailed as e:
        print(f"image.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
