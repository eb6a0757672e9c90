"""Case names: safe, visible and unique file names; private names (pseudonyms) with a key kept in OUT/private.

A case's outputs are ``OUT/NAME_seg.nii.gz`` and ``OUT/ledger/NAME.json``, so a name must not climb out of OUT
(``..``, path separators), hide itself (a leading dot) or collide with another case. :func:`safe_name` makes a
name so; :func:`make_unique` adds ``_2``, ``_3``... to repeats in input order.

DICOM folder names are often patient IDs or names (``PAT000``, ``DOE^JOHN``). With private names (the default
for DICOM), such a case is named ``c`` + 10 hex digits: an HMAC of its folder and series UID under a secret kept
in ``OUT/private/secret`` (so a re-run into the same OUT gives the same names, and nobody without the secret can
test a guessed folder name against a pseudonym), and ``OUT/private/names.csv`` maps each name back to its folder
and series. The public tables then carry no folder names.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 96
PRIVATE_DIR = "private"
KEY_COLUMNS = ("case", "kind", "path", "series_uid", "series_number")


def safe_name(raw: str) -> str:
    """``raw`` as a visible file name without separators: unsafe characters -> ``-``, no leading ``.``/``-``,
    no ``..`` anywhere, at most MAX_NAME characters; ``case`` when nothing is left."""
    name = _UNSAFE.sub("-", str(raw))
    name = re.sub(r"\.{2,}", "-", name).lstrip(".-_")[:MAX_NAME].rstrip(".")
    return name or "case"


def make_unique(items: list, attr: str = "name", used: set[str] | None = None) -> set[str]:
    """Two items with the same name get ``_2``, ``_3``, ... in input order (names compared case-insensitively,
    as a macOS or Windows share would); ``used``: names taken already. Returns the names taken."""
    used = set() if used is None else used
    for item in items:
        base = getattr(item, attr)
        name, n = base, 1
        while name.lower() in used:
            n += 1
            name = f"{base}_{n}"
        setattr(item, attr, name)
        used.add(name.lower())
    return used


class Pseudonyms:
    """Private case names under the secret of one OUT folder (created on first use, mode 0600)."""

    def __init__(self, out_dir: Path):
        self.folder = Path(out_dir) / PRIVATE_DIR
        self._secret: bytes | None = None

    @property
    def secret(self) -> bytes:
        """The OUT folder's secret, created (0600, in a 0700 folder) the first time a private name is made."""
        if self._secret is None:
            secret_file = self.folder / "secret"
            if not secret_file.is_file():
                self.folder.mkdir(parents=True, exist_ok=True)
                os.chmod(self.folder, 0o700)
                fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self._secret = bytes.fromhex(secret_file.read_text().strip())
        return self._secret

    def name(self, key: str) -> str:
        return "c" + hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()[:10]

    def write_key(self, rows: list[dict]) -> Path:
        """``OUT/private/names.csv``: case -> kind, path, series UID and number (atomic)."""
        import csv

        from ..imageio import write_atomic

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(KEY_COLUMNS))
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in KEY_COLUMNS} for r in rows)

        self.folder.mkdir(parents=True, exist_ok=True)
        return write_atomic(self.folder / "names.csv", write)
