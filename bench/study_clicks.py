"""Annotation study v2 (issue 21): on a hard site, the simulated annotator corrects with clicks, then paints.

Used by ``bench/annotation_study.py --hard-site SITE``. Per case: the served model's proposal (segment
task), then for each structure the click protocol of ``mrannotator.evaluation.clicks`` through the server's
``mrannotator_refine`` task with SmartEdit's parameters (all clicks so far for the structure, points as
voxel indices of the image as stored), until Dice >= 0.95 or 20 clicks; then the annotator paints the
rest. Effort per case: clicks, voxels painted (voxels still wrong after the clicks) and slices touched
(axial slices with a click or a painted voxel). Arms: ``uncertainty`` and ``random`` (active learning +
fine-tuning after every round, as in v1) and ``no_finetune`` (clicks only; the model never changes).

Results go to ``--out`` under ``"hard_site"``; the easy-site results in that file stay as they are.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REFINE_TASK = "mrannotator_refine"
TARGET_DICE, MAX_CLICKS = 0.95, 20
ARMS = ("uncertainty", "random", "no_finetune")


def smartedit_params(labels: list[str], label: str, foreground: list, background: list) -> dict:
    """The params 3D Slicer's SmartEdit (multi-label) sends: one key per /info label, ``label``, points."""
    params = {name: [] for name in labels}
    params.update({label: [list(map(int, p)) for p in foreground],
                   "background": [list(map(int, p)) for p in background], "label": label})
    return params


def click_then_paint(client, image_id: str, truth: np.ndarray, spacing, structures: dict[int, str],
                     labels: list[str], study) -> dict:
    """Correct one case through the server: clicks per structure, then paint; the effort of each."""
    from mrannotator.evaluation.clicks import dice, next_click

    path, _ = client.infer(study.TASK, image_id, {})
    current = study._labels(path)
    Path(path).unlink(missing_ok=True)
    start_dice = float(np.mean(list(study.dice_per_structure(truth, current, structures).values())))
    clicks, clicked_slices, seconds = 0, set(), []
    for sid, name in structures.items():
        fg, bg = [], []
        mask = truth == sid
        while len(fg) + len(bg) < MAX_CLICKS and dice(mask, current == sid) < TARGET_DICE:
            click = next_click(mask, current == sid, spacing)
            if click is None:
                break
            (fg if click.foreground else bg).append(click.point)
            clicked_slices.add(click.point[2])
            t0 = time.perf_counter()
            path, _ = client.infer(REFINE_TASK, image_id, smartedit_params(labels, name, fg, bg))
            seconds.append(time.perf_counter() - t0)
            current = study._labels(path)
            Path(path).unlink(missing_ok=True)
            clicks += 1
    wrong = truth != current
    painted_slices = set(np.flatnonzero(wrong.any(axis=(0, 1))).tolist())
    return {"id": image_id, "start_dice": round(start_dice, 4), "clicks": clicks,
            "dice_after_clicks": round(float(np.mean(list(study.dice_per_structure(truth, current, structures)
                                                         .values()))), 4),
            "voxels_painted": int(wrong.sum()), "slices_touched": len(clicked_slices | painted_slices),
            "refine_seconds_p95": round(float(np.percentile(seconds, 95)), 3) if seconds else None}


def run_arm(client, site, arm: str, schedule: list[int], train_params: dict, study, log=print,
            deadline: float | None = None, start: dict | None = None, probe_pause: float = 5.0) -> dict:
    """One arm: each round the annotator corrects the picked cases, saves them final, then (unless
    ``no_finetune``) the server fine-tunes and the held-out sets are re-evaluated."""
    labels = list(client.info()["labels"])
    for case in site.replay:
        client.save_label(case.name, str(case.truth), "final")
    rounds, labelled = [], 0
    for r, k in enumerate(schedule, start=1):
        if deadline and time.time() > deadline:
            log(f"[{arm}] stopping before round {r}: out of time")
            break
        cases = []
        for _ in range(k):
            image_id = client.next_sample("random" if arm == "no_finetune" else arm, {})["id"]
            case = site.truth_of(image_id)
            truth = study._labels(case.truth)
            spacing = tuple(float(x) for x in np.linalg.norm(nib.load(str(case.image)).affine[:3, :3], axis=0))
            cases.append(click_then_paint(client, image_id, truth, spacing, site.structures, labels, study))
            client.save_label(image_id, str(case.truth), "final")
        labelled += k
        if arm == "no_finetune":
            train, ev = {"train_seconds": 0.0}, start or study.evaluate(client, site)
        else:
            train = study._train(client, train_params, probe_image=site.replay[0].name if site.replay else image_id,
                                 probe_pause=probe_pause)
            ev = study.evaluate(client, site)
        row = {"labelled": labelled, "new_site_dice": ev["new_site_dice"], "original_dice": ev["original_dice"],
               **{f"{key}_per_case": round(float(np.mean([c[key] for c in cases])), 2)
                  for key in ("clicks", "voxels_painted", "slices_touched")},
               "train_seconds": train["train_seconds"], "cases": cases}
        log(f"[{arm}] round {r}: " + json.dumps({x: v for x, v in row.items() if x != "cases"}))
        rounds.append(row)
    return {"rounds": rounds}


def main_hard(args, study, schedule: list[int], train_params: dict, deadline, log) -> int:
    """``annotation_study.py --hard-site SITE``: every arm on its own server; ``"hard_site"`` of ``--out``."""
    import tempfile

    from monailabel.client import MONAILabelClient

    part: dict = {"site": args.hard_site, "start": None, "arms": {},
                  "command": "python bench/annotation_study.py " + " ".join(args.argv)}
    with tempfile.TemporaryDirectory(prefix="mra-study2-") as tmp:
        for arm in args.arms.split(","):
            root = Path(tmp) / arm
            (root / "client").mkdir(parents=True)
            site = study.make_site(root, args.weights, args.pool, args.heldout, args.original, args.replay,
                                   study.site_seeds(args.repeat), new_site=args.hard_site)
            server = study.start_study_server(root, site, args.weights)
            try:
                client = MONAILabelClient(server.url, tmpdir=str(root / "client"))
                if part["start"] is None:
                    ev = study.evaluate(client, site)
                    part["start"] = {"new_site_dice": ev["new_site_dice"], "original_dice": ev["original_dice"]}
                    log(f"hard site {args.hard_site} start: {part['start']}")
                part["arms"][arm] = run_arm(client, site, arm, schedule, train_params, study, log, deadline,
                                            start=part["start"], probe_pause=args.probe_pause)
                _save(args.out, part)
            finally:
                study.stop_study_server(server)
    _save(args.out, part)
    return 0


def _save(out: Path, part: dict) -> None:
    result = json.loads(out.read_text()) if out.exists() else {}
    result["hard_site"] = part
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def _repeat_of(part: dict) -> int:
    words = part.get("command", "").split()
    return int(words[words.index("--repeat") + 1]) if "--repeat" in words else 0


def arm_summary(arm: dict, start: dict) -> dict:
    """The acceptance figures of one arm: effort ratios round 1 / last round, Dice after the last round."""
    rounds = arm["rounds"]
    first, last = rounds[0], rounds[-1]

    def ratio(key: str) -> float | None:
        return round(first[key] / last[key], 2) if last[key] else None

    return {"rounds_done": len(rounds), "labelled": last["labelled"],
            "clicks_per_case": [r["clicks_per_case"] for r in rounds],
            "slices_touched_per_case": [r["slices_touched_per_case"] for r in rounds],
            "voxels_painted_per_case": [r["voxels_painted_per_case"] for r in rounds],
            "clicks_ratio_first_to_last": ratio("clicks_per_case"),
            "slices_ratio_first_to_last": ratio("slices_touched_per_case"),
            "new_site_dice_last": last["new_site_dice"],
            "original_drop": round(start["original_dice"] - last["original_dice"], 4)}


def combine_hard(files: list[Path], out: Path) -> int:
    """Merge v2 results run as separate processes (one arm / repeat each) into ``"hard_site"`` of ``out``:
    repeat 0's arms as ``arms``, every repeat under ``repeats``, and per arm the spread (min, max) of the
    acceptance figures over the repeats."""
    parts = [json.loads(Path(f).read_text())["hard_site"] for f in files]
    by_repeat: dict[int, dict] = {}
    for part in parts:
        entry = by_repeat.setdefault(_repeat_of(part), {"start": part["start"], "arms": {}, "commands": []})
        entry["arms"].update(part["arms"])
        entry["commands"].append(part["command"])
    for entry in by_repeat.values():
        entry["summary"] = {arm: arm_summary(a, entry["start"]) for arm, a in entry["arms"].items() if a["rounds"]}
    spread: dict = {}
    for arm in ARMS:
        rows = [e["summary"][arm] for e in by_repeat.values() if arm in e["summary"]]
        if not rows:
            continue
        spread[arm] = {"repeats": len(rows)}
        for key in ("clicks_ratio_first_to_last", "slices_ratio_first_to_last", "new_site_dice_last",
                    "original_drop", "labelled"):
            values = [r[key] for r in rows if r[key] is not None]
            spread[arm][key] = {"min": min(values), "max": max(values)} if values else None
    first = by_repeat[min(by_repeat)]
    part = {"site": parts[0]["site"], "start": first["start"], "arms": first["arms"],
            "repeats": [{"repeat": r, **e} for r, e in sorted(by_repeat.items())], "spread": spread,
            "command": "python bench/annotation_study.py --combine-hard " + " ".join(str(f) for f in files)}
    _save(out, part)
    print(json.dumps(spread, indent=1))
    return 0
