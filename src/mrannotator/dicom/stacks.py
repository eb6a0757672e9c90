"""One series, several 3D stacks: echoes, b-values, time points, acquisitions; and the checks of one stack.

A series whose instances share slice positions is split into stacks by the first of these that makes every
position unique within each stack (AcquisitionNumber only when the others do not suffice: many scanners
number 2D acquisitions per slice):

    echo=N          N-th echo by EchoTime (1 = shortest)
    b=VALUE         DiffusionBValue (or Siemens' / GE's private b-value when the standard one is absent)
    time=N          TemporalPositionIdentifier
    acquisition=N   AcquisitionNumber
    volume=N        N-th repetition of the positions by InstanceNumber, where no header above tells repeated
                    volumes apart (GE fMRI; diffusion directions of one b-value: ``b=1000,volume=3``)

Each stack is a candidate named by its key (``echo=2``, ``b=1000``, ``echo=1,time=3``). The default is the
first stack: first echo, lowest b-value (b=0), first time point, first acquisition. ``--stack KEY`` (CLI),
``MRANNOTATOR_STACK`` (MAP), ``stack=`` (API, batch, datastore) picks another; a key may name only some of
the series' dimensions (the others take their first value). Two instances at one position that nothing
tells apart (the same values and InstanceNumber, or a position held more often than the others) are a
duplicated slice, refused as such.

A stack's InstanceNumbers must start at 1 (and reach ImagesInAcquisition where it is written): a missing
first or last slice cannot be seen from the positions. ``ignore_instance_gaps`` (``--ignore-instance-gaps``,
``MRANNOTATOR_IGNORE_INSTANCE_GAPS=1``) accepts such a stack, e.g. a series renumbered by an export.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..errors import InputError
from .geometry import COS_TOL, POS_TOL_MM, StackError, header_vector, slice_axes

DIMENSIONS = ("echo", "b", "time", "acquisition")
_NAMES = {"echo": "EchoTime", "b": "b-value", "time": "TemporalPositionIdentifier",
          "acquisition": "AcquisitionNumber"}
GREYSCALE = ("MONOCHROME2", "MONOCHROME1")


@dataclass(frozen=True)
class Stack:
    """One 3D stack of a series: ``key`` ("" when the series is one stack), its indices in the series."""

    key: str
    indices: tuple[int, ...]
    values: tuple[tuple[str, float], ...] = ()  # (dimension, value) the key is made of


def _number(value) -> float | None:
    try:
        out = float(value[0] if isinstance(value, list | tuple | MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if np.isfinite(out) else None


def _private(ds: Dataset, group: int, creator: str, offset: int):
    """A private element by its creator's block (None when the creator is not there)."""
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        return None


def b_value(ds: Dataset) -> float | None:
    """DiffusionBValue, else Siemens' B_value (0019,xx0C), else GE's slop_int_6 (0043,xx39) modulo 1e9."""
    for value in (ds.get("DiffusionBValue"), _private(ds, 0x0019, "SIEMENS MR HEADER", 0x0C)):
        if value is not None and _number(value) is not None:
            return _number(value)
    ge = _number(_private(ds, 0x0043, "GEMS_PARM_01", 0x39))
    return None if ge is None else ge % 1e9


def dimension_value(ds: Dataset, dim: str) -> float | None:
    if dim == "echo":
        return _number(ds.get("EchoTime"))
    if dim == "b":
        return b_value(ds)
    return _number(ds.get("TemporalPositionIdentifier" if dim == "time" else "AcquisitionNumber"))


def _positions(datasets: Sequence[Dataset]) -> list[int]:
    """Each instance's position along the slice normal, in POS_TOL_MM steps (equal = same slice)."""
    row, col = slice_axes(datasets[0])
    normal = np.cross(row, col)
    return [int(round(float(header_vector(ds, "ImagePositionPatient", 3) @ normal) / POS_TOL_MM)) for ds in datasets]


def _key_text(dims: Sequence[str], values: tuple, ranks: dict) -> tuple[str, tuple]:
    parts, named = [], []
    for dim, v in zip(dims, values, strict=True):
        shown = ranks[dim][v] if dim == "echo" else v
        text = "none" if shown is None else f"{shown:g}"
        parts.append(f"{dim}={text}")
        named.append((dim, -1.0 if shown is None else float(shown)))
    return ",".join(parts), tuple(named)


def _group(datasets, dims) -> dict[tuple, list[int]]:
    """Indices grouped by the values of ``dims``."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, ds in enumerate(datasets):
        groups[tuple(dimension_value(ds, d) for d in dims)].append(i)
    return groups


def _one_position_each(groups: dict[tuple, list[int]], positions: list[int]) -> bool:
    return all(len({positions[i] for i in g}) == len(g) for g in groups.values())


def _volumes(group: list[int], datasets, positions) -> list[list[int]] | None:
    """A group repeating every position equally often, split by InstanceNumber at each position (volume 1 =
    the lowest numbers); None when it is not that (a position more often than others, numbers repeated)."""
    at: dict[int, list[int]] = defaultdict(list)
    for i in group:
        at[positions[i]].append(i)
    numbers = [_number(datasets[i].get("InstanceNumber")) for i in group]
    if len({len(v) for v in at.values()}) != 1 or None in numbers or len(set(numbers)) != len(numbers):
        return None
    ordered = [sorted(v, key=lambda i: _number(datasets[i].get("InstanceNumber"))) for v in at.values()]
    return [[at_position[n] for at_position in ordered] for n in range(len(ordered[0]))]


def _duplicate_message(datasets, positions) -> str:
    seen: dict[int, int] = {}
    for i, ds in enumerate(datasets):
        if positions[i] in seen:
            a, b = datasets[seen[positions[i]]], ds
            return (f"duplicated slice: instances {a.get('InstanceNumber', '?')} and {b.get('InstanceNumber', '?')} "
                    f"({a.SOPInstanceUID}, {b.SOPInstanceUID}) lie at the same position "
                    f"({positions[i] * POS_TOL_MM:.3f} mm along the slice normal) with the same "
                    f"{' / '.join(_NAMES.values())}: remove the copy")
        seen[positions[i]] = i
    return "several slices share one position and nothing tells them apart"


def split_stacks(datasets: Sequence[Dataset]) -> list[Stack]:
    """The 3D stacks of one series, default first; :class:`StackError` naming a duplicated slice."""
    positions = _positions(datasets)
    iop = header_vector(datasets[0], "ImageOrientationPatient", 6)
    parallel = all(np.allclose(header_vector(ds, "ImageOrientationPatient", 6), iop, atol=COS_TOL) for ds in datasets)
    if len(set(positions)) == len(positions) or not parallel:  # stack_geometry names mixed orientations
        return [Stack("", tuple(range(len(datasets))))]
    varying = [d for d in DIMENSIONS if len({dimension_value(ds, d) for ds in datasets}) > 1]
    dims = [d for d in varying if d != "acquisition"]
    groups = _group(datasets, dims)
    if not _one_position_each(groups, positions) and "acquisition" in varying:
        with_acquisition = _group(datasets, varying)
        if _one_position_each(with_acquisition, positions):
            dims, groups = varying, with_acquisition
    echoes = {v[dims.index("echo")] for v in groups} - {None} if "echo" in dims else set()
    ranks = {"echo": {te: n for n, te in enumerate(sorted(echoes), 1)} | {None: None}}
    stacks = []
    for values, indices in groups.items():
        key, named = _key_text(dims, values, ranks)
        if len({positions[i] for i in indices}) == len(indices):
            stacks.append(Stack(key, tuple(indices), named))
            continue
        volumes = _volumes(indices, datasets, positions)
        if volumes is None:
            raise StackError(_duplicate_message([datasets[i] for i in indices], [positions[i] for i in indices]))
        for n, volume in enumerate(volumes, 1):
            stacks.append(Stack(f"{key},volume={n}".lstrip(","), tuple(volume), (*named, ("volume", float(n)))))
    return sorted(stacks, key=lambda s: [v for _, v in s.values])


def parse_stack(text: str | None) -> dict[str, float] | None:
    """``echo=2,b=1000`` -> {"echo": 2.0, "b": 1000.0}; InputError naming what is wrong."""
    if text is None or not str(text).strip():
        return None
    wanted = {}
    for part in str(text).split(","):
        dim, _, value = part.strip().partition("=")
        if dim.strip() not in (*DIMENSIONS, "volume") or _number(value.strip()) is None:
            raise InputError(f"stack {text!r} is not a stack key: write DIM=VALUE[,DIM=VALUE] with DIM one of "
                             f"{', '.join(DIMENSIONS)}, volume (e.g. echo=2, b=1000, time=3)")
        wanted[dim.strip()] = _number(value.strip())
    return wanted


def pick_stack(stacks: list[Stack], stack: str | None) -> Stack | str:
    """The stack ``stack`` names (the default, first one when None), or the reason none can be picked."""
    wanted = parse_stack(stack)
    if wanted is None or len(stacks) == 1:
        return stacks[0]
    for s in stacks:
        values = dict(s.values)
        if all(dim in values and abs(values[dim] - v) < 1e-6 for dim, v in wanted.items()):
            return s
    return f"stack {stack} is not in this series; its stacks: {', '.join(s.key for s in stacks)}"


def image_rule_failed(datasets: Sequence[Dataset]) -> str | None:
    """The pixel-format rule ``datasets`` fail (colour, mixed photometric, Siemens MOSAIC), or None."""
    kinds = {str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() for ds in datasets}
    other = sorted(kinds - set(GREYSCALE))
    if other:
        return (f"PhotometricInterpretation {other[0]}: MRAnnotator reads greyscale MR "
                "(MONOCHROME2, or MONOCHROME1 which it inverts), not colour or palette images")
    if len(kinds) > 1:
        return "the series mixes MONOCHROME1 and MONOCHROME2 instances"
    if any(int(ds.get("SamplesPerPixel", 1) or 1) != 1 for ds in datasets):
        return "more than one sample per pixel (a colour image): MRAnnotator reads greyscale MR"
    mosaic = _number(_private(datasets[0], 0x0019, "SIEMENS MR HEADER", 0x0A))
    if "MOSAIC" in [str(v).upper() for v in (datasets[0].get("ImageType") or [])] or (mosaic or 1) > 1:
        tiles = f" ({int(mosaic)} slices tiled in each image)" if mosaic else ""
        return (f"Siemens MOSAIC{tiles}: MRAnnotator does not unpack mosaics; convert the series with "
                "dcm2niix and segment the NIfTI")
    return None


def invert_monochrome1(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """MONOCHROME1 stored values mirrored within the stored range, to the MR convention (bright = high).

    v -> lo + hi - v with lo..hi the range BitsStored / PixelRepresentation allow: the image the same
    instance would hold stored as MONOCHROME2, applied before the modality rescale.
    """
    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return (lo + hi - frame.astype(np.int64)).astype(frame.dtype)


def stack_problem(stacks: list[Stack], chosen: Stack, datasets: Sequence[Dataset]) -> str | None:
    """Why the chosen stack is incomplete at its ends (InstanceNumber / ImagesInAcquisition / stack sizes)."""
    sizes = {s.key: len(s.indices) for s in stacks}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        return f"the stacks of the series have different slice counts ({listed}): slices are missing"
    everyone = [_number(ds.get("InstanceNumber")) for ds in datasets]
    if None in everyone:
        return None
    unique = len(set(everyone)) == len(everyone)  # else numbered per stack
    numbers = sorted(everyone if unique else [everyone[i] for i in chosen.indices])
    first, last = int(numbers[0]), int(numbers[-1])
    where = f" of stack {chosen.key}" if not unique and chosen.key else ""
    if first > 1:
        missing = "1" if first == 2 else f"1..{first - 1}"
        return (f"InstanceNumber {missing} missing: the first slice(s){where} are not in the input "
                f"(instances {first}..{last} present)")
    expected = _number(datasets[0].get("ImagesInAcquisition"))
    if expected is not None and len(stacks) == 1 and int(expected) > last:
        missing = str(last + 1) if last + 1 == int(expected) else f"{last + 1}..{int(expected)}"
        return (f"InstanceNumber {missing} missing: ImagesInAcquisition is {int(expected)}, "
                f"the last slice(s){where} are not in the input (instances {first}..{last} present)")
    return None
