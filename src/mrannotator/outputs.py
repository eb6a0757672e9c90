"""Writing a case's results: the label NIfTI and the structures JSON, atomically, under one naming rule.

Used by the CLI (``mrannotator segment``) and the batch worker, so both write the same files the same way.
"""

from __future__ import annotations

from pathlib import Path

from .errors import OutputError


def output_paths(out_dir: Path, case: str) -> tuple[Path, Path]:
    return out_dir / f"{case}_seg.nii.gz", out_dir / f"{case}_structures.json"


def check_output_dir(out_dir: Path, case: str) -> None:
    """Before minutes of inference: the folder (or the folder it will be made in) can be written, and no
    folder sits on a result name. Creates nothing: a run that fails later leaves no empty output folder."""
    import tempfile

    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to the output folder {out_dir}: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mrannotator-write-check-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to the output folder {out_dir}: {e.strerror or e}") from e
    for path in output_paths(out_dir, case):
        if path.exists() and not path.is_file():
            raise OutputError(f"cannot write {path}: something that is not a file is in the way")


def write_outputs(result, out_dir: Path, case: str, source: str) -> tuple[Path, Path]:
    """Label NIfTI + structures JSON, each written atomically (no partial file on failure)."""
    from .imageio import save_json, save_nifti

    report = {"input": source, **result.summary()}
    seg_path, json_path = output_paths(out_dir, case)
    seg_existed = seg_path.exists()
    save_nifti(result.labels, seg_path)
    try:
        save_json(report, json_path)
    except OSError as e:
        if not seg_existed:  # no label map without its report
            seg_path.unlink(missing_ok=True)
        raise OutputError(f"cannot write {json_path}: {e.strerror or e}") from e
    return seg_path, json_path
