"""Region routing: DICOM header keywords -> the region models worth running on a series.

The keyword table is data (``mrannotator/data/region_keywords.toml``); this module only matches it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ..catalogue import expand_regions

# the header fields routing reads, in the order a match is reported
ROUTING_FIELDS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")
_WORD = re.compile(r"[A-Z0-9]+")


@dataclass(frozen=True)
class Route:
    """The regions to run on one case (None: all) and why."""

    regions: tuple[str, ...] | None
    reason: str  # e.g. "BodyPartExamined=KNEE", "no region keyword in the header", "--regions knee"

    @property
    def label(self) -> str:
        return ",".join(self.regions) if self.regions else "all"


class RegionKeywords:
    """Keyword (a sequence of words) -> regions, matched longest first on whole words."""

    def __init__(self, table: Mapping[str, list[str]]):
        self._by_words: dict[tuple[str, ...], tuple[str, ...]] = {}
        for keyword, regions in table.items():
            words = tuple(_WORD.findall(keyword.upper()))
            if not words:
                raise ValueError(f"region keyword table: empty keyword {keyword!r}")
            expanded = expand_regions(regions)  # raises on a region the catalogue does not know
            if not expanded:
                raise ValueError(f"region keyword table: {keyword!r} names no region")
            self._by_words[words] = tuple(sorted(expanded))
        self._longest = max((len(w) for w in self._by_words), default=0)

    def find(self, text: str) -> list[tuple[str, tuple[str, ...]]]:
        """(keyword found, its regions) for each keyword in ``text``, scanning left to right."""
        words = _WORD.findall(str(text).upper())
        found = []
        i = 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                regions = self._by_words.get(tuple(words[i:i + n]))
                if regions:
                    found.append((" ".join(words[i:i + n]), regions))
                    i += n
                    break
            else:
                i += 1
        return found

    def route(self, header: Mapping[str, object]) -> Route:
        """Regions named by the routing fields of ``header`` (a dict or a pydicom Dataset); none -> all."""
        regions: set[str] = set()
        reasons = []
        for name in ROUTING_FIELDS:
            value = header.get(name) if isinstance(header, Mapping) else getattr(header, name, None)
            if not value:
                continue
            hits = self.find(str(value))
            for _, r in hits:
                regions.update(r)
            if hits:
                reasons.append(f"{name}={str(value).strip()}")
        if not regions:
            return Route(None, "no region keyword in the header")
        return Route(tuple(sorted(regions)), "; ".join(reasons))


@cache
def load_region_keywords() -> RegionKeywords:
    text = resources.files("mrannotator").joinpath("data/region_keywords.toml").read_text()
    return RegionKeywords(tomllib.loads(text)["keywords"])
