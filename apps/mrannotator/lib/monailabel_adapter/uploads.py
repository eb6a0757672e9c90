"""Per-request upload folders, removed whatever happens; upload paths redacted (fix 4)."""

from __future__ import annotations

import atexit
import contextvars
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _RequestTemp:
    root: Path
    path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self) -> str:
        with self.lock:
            if self.path is None:
                self.path = Path(_original_mkdtemp(prefix="req-", dir=self.root))
            return str(self.path)

    def remove(self) -> None:
        with self.lock:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None


_request_temp: contextvars.ContextVar[_RequestTemp | None] = contextvars.ContextVar("mrannotator_request_temp",
                                                                                     default=None)
_original_gettempdir = tempfile.gettempdir
_original_mkdtemp = tempfile.mkdtemp
UPLOAD_ROOT: Path | None = None


def _gettempdir() -> str:
    current = _request_temp.get()
    return current.get() if current is not None else _original_gettempdir()


def _gettempdirb() -> bytes:
    return os.fsencode(_gettempdir())


def request_upload_dir() -> Path | None:
    """This request's private temp folder, if it has written anything (uploads are written there)."""
    current = _request_temp.get()
    return current.path if current is not None else None


def is_request_upload(path: str) -> bool:
    """A file written under the upload folders (an upload of this or any other request)."""
    return UPLOAD_ROOT is not None and Path(path).resolve().is_relative_to(UPLOAD_ROOT)


def redact(text: str) -> str:
    """Upload file names (and their folder) replaced by ``<upload>``."""
    if UPLOAD_ROOT is None:
        return text
    return re.sub(re.escape(str(UPLOAD_ROOT)) + r"[^\s'\"),;]*", "<upload>", text)


class RedactUploads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if UPLOAD_ROOT is not None:
            message = record.getMessage()
            if str(UPLOAD_ROOT) in message:
                record.msg, record.args = redact(message), ()
        return True


def install(upload_root: Path) -> None:
    """Per-request temp folders under ``upload_root`` (cleared now: folders of requests cut short by a
    killed server), and upload paths redacted in every log handler."""
    global UPLOAD_ROOT
    shutil.rmtree(upload_root, ignore_errors=True)
    upload_root.mkdir(parents=True, mode=0o700)
    atexit.register(shutil.rmtree, upload_root, ignore_errors=True)
    UPLOAD_ROOT = upload_root.resolve()
    tempfile.gettempdir, tempfile.gettempdirb = _gettempdir, _gettempdirb
    redactor = RedactUploads()
    for lg in [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]:
        for handler in getattr(lg, "handlers", []):
            if redactor not in handler.filters:
                handler.addFilter(redactor)


def default_root(port: int) -> Path:
    """Where requests' temp folders go: one per user and port, so a restarted server clears its own."""
    return Path(_original_gettempdir()) / f"mrannotator-uploads-{os.getuid()}-{port}"
