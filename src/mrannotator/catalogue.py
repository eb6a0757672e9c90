"""The label catalogue: every known structure with one stable id, region, SNOMED CT codes and colour.

The data lives in ``data/catalogue.toml`` (structures, the region list and the region aliases users may
give); this module only loads and looks it up. Other tables that belong with it (e.g. how to route an
image to regions) go next to it in ``data/`` and are read with :func:`read_data_toml`.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from .errors import InputError


@cache
def read_data_toml(name: str) -> dict:
    """A TOML table shipped in ``mrannotator/data`` (parsed once per process)."""
    return tomllib.loads(resources.files("mrannotator").joinpath("data", name).read_text())


_CATALOGUE_FILE = "catalogue.toml"
REGIONS: tuple[str, ...] = tuple(read_data_toml(_CATALOGUE_FILE)["regions"])
# region names a user may give beyond the regions themselves (e.g. "spine")
REGION_ALIASES: dict[str, tuple[str, ...]] = {
    alias: tuple(regions) for alias, regions in read_data_toml(_CATALOGUE_FILE).get("region_aliases", {}).items()
}


for _alias, _targets in REGION_ALIASES.items():
    if _alias in REGIONS or not _targets or not set(_targets) <= set(REGIONS):
        raise ValueError(f"catalogue: region alias {_alias!r} must be a new name for regions of {REGIONS}")


def region_names() -> list[str]:
    """Every name ``expand_regions`` accepts besides ``all``: the regions, then the aliases."""
    return [*REGIONS, *REGION_ALIASES]


def expand_regions(regions: Iterable[str] | None) -> set[str] | None:
    """The catalogue regions meant by user-given names and aliases; None for all (None, "all" or "")."""
    if regions is None:
        return None
    out: set[str] = set()
    for r in regions:
        r = r.strip().lower()
        if r in ("all", ""):
            return None
        if r in REGION_ALIASES:
            out.update(REGION_ALIASES[r])
        elif r in REGIONS:
            out.add(r)
        else:
            raise InputError(f"unknown region {r!r}; choose from {', '.join(region_names())}")
    return out


# Ids handed to model labels that the catalogue does not know start here (still below 256).
FIRST_UNCATALOGUED_ID = 200


@dataclass(frozen=True)
class Code:
    scheme: str
    code: str
    meaning: str


@dataclass(frozen=True)
class Structure:
    id: int
    name: str
    display: str
    region: str
    type: Code
    category: Code
    color: tuple[int, int, int]
    laterality: Code | None = None
    model_names: tuple[str, ...] = field(default=())
    catalogued: bool = True

    def as_dict(self) -> dict:
        d = {
            "id": self.id,
            "name": self.name,
            "display": self.display,
            "region": self.region,
            "snomed_category": self.category.__dict__,
            "snomed_type": self.type.__dict__,
            "laterality": self.laterality.__dict__ if self.laterality else None,
            "color": list(self.color),
        }
        if not self.catalogued:
            d["catalogued"] = False
        return d


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


class UnknownStructureError(KeyError):
    pass


class LabelCatalogue:
    """Structures by id and by name; model label names are matched case/space/underscore-blind."""

    def __init__(self, data: dict):
        self.category = Code(**data["category"])
        self._laterality = {k: Code(**v) for k, v in data["laterality"].items()}
        self.unknown_type = Code(**data["unknown"]["type"])
        self.unknown_color = tuple(data["unknown"]["color"])
        self.structures: list[Structure] = []
        self._by_id: dict[int, Structure] = {}
        self._by_name: dict[str, Structure] = {}
        for entry in data["structure"]:
            s = Structure(
                id=int(entry["id"]),
                name=entry["name"],
                display=entry["display"],
                region=entry["region"],
                type=Code(**entry["type"]),
                category=self.category,
                color=tuple(entry["color"]),
                laterality=self._laterality[entry["laterality"]] if "laterality" in entry else None,
                model_names=tuple(entry.get("model_names", ())),
            )
            if s.region not in REGIONS:
                raise ValueError(f"catalogue: structure {s.name!r} has unknown region {s.region!r}")
            if s.id in self._by_id or not 0 < s.id < FIRST_UNCATALOGUED_ID:
                raise ValueError(f"catalogue: id {s.id} of {s.name!r} is duplicated or out of range")
            self.structures.append(s)
            self._by_id[s.id] = s
            for n in (s.name, *s.model_names):
                key = _norm(n)
                if key in self._by_name and self._by_name[key] is not s:
                    raise ValueError(f"catalogue: name {n!r} matches two structures")
                self._by_name[key] = s

    def __len__(self) -> int:
        return len(self.structures)

    def __iter__(self):
        return iter(self.structures)

    def by_id(self, sid: int) -> Structure:
        try:
            return self._by_id[int(sid)]
        except KeyError:
            raise UnknownStructureError(f"no structure with catalogue id {sid}") from None

    def find(self, name: str) -> Structure | None:
        """The structure a model label name (or catalogue name) means, or None."""
        return self._by_name.get(_norm(name))

    def get(self, name: str) -> Structure:
        s = self.find(name)
        if s is None:
            raise UnknownStructureError(f"unknown structure {name!r}: not in the label catalogue")
        return s

    def in_regions(self, regions) -> list[Structure]:
        regions = set(regions)
        return [s for s in self.structures if s.region in regions]

    def uncatalogued(self, model_label: str, sid: int, region: str) -> Structure:
        """A stand-in entry for a model label the catalogue does not know (generic code, grey)."""
        warnings.warn(
            f"model label {model_label!r} is not in the MRAnnotator label catalogue; it is served as "
            f"id {sid} with the generic code {self.unknown_type.meaning!r}",
            stacklevel=2,
        )
        return Structure(
            id=sid,
            name=_norm(model_label) if model_label else f"label_{sid}",
            display=model_label,
            region=region,
            type=self.unknown_type,
            category=self.category,
            color=self.unknown_color,
            model_names=(model_label,),
            catalogued=False,
        )


@cache
def load_catalogue() -> LabelCatalogue:
    return LabelCatalogue(read_data_toml(_CATALOGUE_FILE))
