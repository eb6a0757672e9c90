"""Label maps: a foreign label scheme (CSV, JSON, nnU-Net dataset.json, a built-in name) -> catalogue ids."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..catalogue import LabelCatalogue, load_catalogue
from ..errors import InputError

# label maps shipped in mrannotator/data, usable by name with --truth-labels / --pred-labels
BUILTIN_LABEL_MAPS = {"total_mr": "totalsegmentator_total_mr.csv"}


@dataclass(frozen=True)
class LabelMap:
    """Label value in a file -> catalogue id; ``ignored`` values are known but have no catalogue structure."""

    ids: dict[int, int]
    ignored: dict[int, str] = field(default_factory=dict)  # value -> the source's name for it
    source: str = "catalogue ids"

    def describe(self, value: int) -> str:
        return self.ignored.get(value, "")


def identity_map(catalogue: LabelCatalogue | None = None) -> LabelMap:
    cat = catalogue or load_catalogue()
    return LabelMap({s.id: s.id for s in cat}, source="catalogue ids")


def load_label_map(source: str | Path, catalogue: LabelCatalogue | None = None) -> LabelMap:
    """A label map from a CSV or JSON file, or a built-in name (``total_mr``).

    CSV: a header with ``value`` and ``structure`` (catalogue name or id; empty = no catalogue
    structure, ignored on purpose); other columns (e.g. ``source_name``) are kept as descriptions.
    JSON: ``{"<value>": "<catalogue name>" | <catalogue id> | null}``, or names to values
    (``{"<name>": <value>}`` or an nnU-Net ``dataset.json`` ``{"labels": {...}}``), where names the
    catalogue does not know are ignored (and reported when they occur).
    Several values may map to one structure (e.g. left and right femur -> ``upper_femora``).
    """
    cat = catalogue or load_catalogue()
    name = str(source)
    if name in BUILTIN_LABEL_MAPS:
        text = resources.files("mrannotator").joinpath("data", BUILTIN_LABEL_MAPS[name]).read_text()
        return _parse_csv_map(text, f"built-in map {name!r}", cat)
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"label map not found: {path} (give a CSV or JSON file, or one of: {', '.join(BUILTIN_LABEL_MAPS)})"
        )
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"label map {path} is not valid JSON: {e}") from e
        return _parse_json_map(data, str(path), cat)
    return _parse_csv_map(text, str(path), cat)


def structure_id(value, where: str, cat: LabelCatalogue) -> int | None:
    """The catalogue id a label map entry names (a catalogue name or id); None for an empty entry."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        try:
            return cat.by_id(int(value)).id
        except KeyError:
            raise InputError(f"{where}: catalogue id {value} does not exist") from None
    s = cat.find(str(value))
    if s is None:
        raise InputError(
            f"{where}: {value!r} is not a structure of the MRAnnotator label catalogue (use a catalogue name, "
            "e.g. 'kidney_left', or leave it empty to ignore that label on purpose)"
        )
    return s.id


def _value(key, where: str) -> int:
    try:
        v = int(str(key).strip())
    except ValueError:
        raise InputError(f"{where}: label value {key!r} is not an integer") from None
    if v < 0:
        raise InputError(f"{where}: label value {v} is negative")
    return v


def _parse_csv_map(text: str, where: str, cat: LabelCatalogue) -> LabelMap:
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = {f.strip().lower() for f in (rows[0].keys() if rows else [])}
    if not rows or "value" not in fields or not ({"structure", "name"} & fields):
        raise InputError(f"label map {where}: needs a header with the columns 'value' and 'structure'")
    ids, ignored = {}, {}
    for i, raw in enumerate(rows, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        v = _value(row["value"], f"label map {where}, line {i}")
        target = row.get("structure", row.get("name", ""))
        sid = structure_id(target, f"label map {where}, line {i}", cat)
        if v in ids or v in ignored:
            raise InputError(f"label map {where}, line {i}: value {v} is listed twice")
        if sid is None:
            ignored[v] = row.get("source_name") or "no catalogue structure"
        else:
            ids[v] = sid
    return LabelMap(ids, ignored, source=where)


def _parse_json_map(data, where: str, cat: LabelCatalogue) -> LabelMap:
    ids, ignored = {}, {}
    by_name = isinstance(data, dict) and data and all(
        not str(k).strip().isdigit() and isinstance(v, int) for k, v in data.items())
    if by_name:  # {"spleen": 1, ...}: name -> value, like dataset.json's labels
        data = {"labels": data}
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):  # nnU-Net dataset.json: name -> value
        for name, v in data["labels"].items():
            v = _value(v, f"label map {where}, label {name!r}")
            if v == 0:
                continue
            s = cat.find(name)
            if s is None:
                ignored[v] = name
            else:
                ids[v] = s.id
        return LabelMap(ids, ignored, source=where)
    if not isinstance(data, dict):
        raise InputError(f"label map {where}: expected an object {{\"<value>\": \"<structure>\"}}")
    for key, target in data.items():
        v = _value(key, f"label map {where}")
        sid = structure_id(target, f"label map {where}, value {v}", cat)
        if sid is None:
            ignored[v] = "no catalogue structure"
        else:
            ids[v] = sid
    return LabelMap(ids, ignored, source=where)
