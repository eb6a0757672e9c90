"""``mrannotator finetune``: fine-tune the region models on labelled images and publish a new model version,
without a server (the run the MONAI Label trainer does, :mod:`mrannotator.training`).

    mrannotator finetune --images IMAGES --labels LABELS --out MODEL_DIR [--weights DIR]

Images and labels are matched by case name (``case.nii.gz`` in both folders); labels hold catalogue ids
on the image's grid. Each run publishes ``MODEL_DIR/versions/<version>`` and switches ``MODEL_DIR/current``
to it atomically; ``mrannotator segment --weights MODEL_DIR/current`` (or a server with ``model_dir``)
serves it. A killed run leaves the previous version current.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import nibabel as nib

from .errors import InputError
from .finetune import Case
from .imageio import case_name
from .training import DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_VAL_ITERATIONS, TrainSettings

NIFTI = (".nii.gz", ".nii")


def _volumes(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist")
    return {case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI)}


def labelled_cases(images: Path, labels: Path) -> list[Case]:
    """Image/label pairs by case name; a label without its image, or on another grid, is refused by name."""
    imgs, labs = _volumes(images, "images"), _volumes(labels, "labels")
    if not labs:
        raise InputError(f"no NIfTI label in {labels}")
    missing = sorted(set(labs) - set(imgs))
    if missing:
        raise InputError(f"labels without an image of the same name in {images}: {', '.join(missing)}")
    cases = []
    for name, label in labs.items():
        li, ii = nib.load(label), nib.load(imgs[name])
        if li.shape[:3] != ii.shape[:3]:
            raise InputError(f"label {label.name} has shape {li.shape[:3]}, its image {ii.shape[:3]}")
        cases.append(Case(name, str(imgs[name]), str(label)))
    return cases


def cmd_finetune(args) -> int:
    from .engine import Segmenter
    from .modelstore import ModelStore
    from .training import FinetuneRun
    from .weights import load_weights

    cases = labelled_cases(Path(args.images), Path(args.labels))  # bad input fails before models load
    settings = TrainSettings(epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
                             learning_rate=args.learning_rate, device=args.device).checked()
    # progress on stderr: nnU-Net's own prints to stdout are silenced while it trains
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    store = ModelStore(Path(args.out))
    store.clean()  # what a killed earlier run left
    pretrained = load_weights(Path(args.weights) if args.weights else None)
    weights, _, version = store.served_weights(pretrained)
    segmenter = Segmenter(weights=weights, device=args.device, regions=args.regions)
    say(f"{len(cases)} labelled case(s); starting from version {version}")
    stats = FinetuneRun(store, pretrained, settings, log=say)(cases, segmenter.models, version)
    for dataset, entry in stats["models"].items():
        last = entry["epochs"][-1] if entry["epochs"] else {}
        say(f"{dataset}: {len(entry['cases'])} case(s), {entry.get('seconds')} s, "
            f"validation Dice {last.get('val_mean_dice')}")
    print(f"published {stats['version']} in {Path(args.out) / 'current'}")
    return 0


def add_finetune_cli(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune the region models on labelled images; publish a new version")
    f.add_argument("--images", required=True, help="folder of NIfTI images (case.nii.gz)")
    f.add_argument("--labels", required=True, help="folder of NIfTI label maps with catalogue ids, same names")
    f.add_argument("--out", required=True, help="model folder: versions/ and the current link are kept there")
    f.add_argument("--weights", default=None, help="pretrained weights (default: installed release, else demo)")
    f.add_argument("--regions", nargs="+", default=None, help="only these regions' models")
    f.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    f.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="training iterations per epoch")
    f.add_argument("--val-iterations", type=int, default=DEFAULT_VAL_ITERATIONS)
    f.add_argument("--learning-rate", type=float, default=DEFAULT_LR)
    f.add_argument("--device", default="cpu", help="cpu or cuda")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_finetune)
    logging.getLogger("mrannotator").setLevel(logging.INFO)
