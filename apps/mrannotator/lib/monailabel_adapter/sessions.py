"""Sessions (3D Slicer's local volumes, ``PUT /session/``) with safe unpacking, an owner and an expiry
(fix 12 of the package docstring).

Upstream (``monailabel/endpoints/session.py``, ``monailabel/utils/sessions.py``, 0.8.5):

- ``uncompress=true`` unpacks with ``shutil.unpack_archive``: members named ``../../x`` or ``/abs/path``
  are written outside the session folder (and anywhere the server may write). Here: :mod:`.archives`.
- upload file names are joined to a temp folder as sent (``..`` as a name: a bare 500).
- any user can read, infer on or delete any session (no owner); a session is usable after its expiry
  until a cleanup job (every 5 minutes) removes it.
- answers and errors carry absolute server paths (``path``, ``image``).
- ``remove_expired`` fails on a folder without ``meta.info``; ``meta.info`` is rewritten in place.

Here: the session's owner is the token's subject (``sub``) when auth is on, else everyone is the same
anonymous user; a session of another owner answers 404 like a missing one (GET, DELETE, infer with
``session_id``). An expired session is removed when it is next looked up. Session ids are MONAI Label's
UUIDs only. A session is built in a staging folder inside the session store and renamed into place, so a
refused upload leaves nothing behind. Answers name the session's image by its name inside the session.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import jwt
from fastapi import HTTPException
from fastapi.responses import FileResponse
from monailabel.utils.sessions import SessionInfo, Sessions

from . import archives

logger = logging.getLogger(__name__)

# None: an internal call (cleanup job), no owner check; "" the anonymous user (auth off)
current_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("mrannotator_session_owner",
                                                                           default=None)
_SESSION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def owner_from_scope(scope, auth: bool) -> str:
    """The request's owner name: the bearer token's subject (verified by the middleware before) or ""."""
    if not auth:
        return ""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            token = value.decode("latin-1").partition(" ")[2].strip()
            try:
                claims = jwt.decode(token, options={"verify_signature": False})
            except jwt.InvalidTokenError:
                return ""
            return str(claims.get("sub") or claims.get("preferred_username") or "")
    return ""


def public(info: SessionInfo) -> dict:
    """A session as answered to clients: no server paths."""
    return {"name": info.name, "image": os.path.basename(info.image), "meta": info.meta,
            "create_ts": info.create_ts, "last_access_ts": info.last_access_ts, "expiry": info.expiry}


class OwnedSessions(Sessions):
    """MONAI Label's session store with owners, expiry on lookup, safe unpacking and atomic writes."""

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            return None
        info = super().get_session(session_id, update_ts=False, fetch_cache=fetch_cache)
        if info is None:
            return None
        if info.expiry > 0 and info.last_access_ts + info.expiry < time.time():
            logger.info(f"session {session_id} expired: removed")
            self.remove_session(session_id)
            return None
        owner = current_owner.get()
        if owner is not None and (info.meta or {}).get("owner", "") != owner:
            return None
        if update_ts:
            info.last_access_ts = int(time.time())
            self._write_meta_info(session_id, info)
        return info

    def remove_session(self, session_id: str):
        if isinstance(session_id, str) and _SESSION_ID.match(session_id):
            super().remove_session(session_id)

    def remove_expired(self):
        count = 0
        if not os.path.isdir(self.store_path):
            return count
        token = current_owner.set(None)
        try:
            for item in os.listdir(self.store_path):
                path = os.path.join(self.store_path, item)
                if item.startswith(".staging-") and time.time() - os.path.getmtime(path) > 3600:
                    shutil.rmtree(path, ignore_errors=True)  # a create cut short by a killed server
                elif _SESSION_ID.match(item) and self.get_session(item, update_ts=False, fetch_cache=False) is None:
                    self.remove_session(item)
                    count += 1
        finally:
            current_owner.reset(token)
        return count

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        """Upstream's signature (one file or a folder of files); see :meth:`create`."""
        return self.create([Path(data_file)], expiry, uncompress)

    def create(self, files: list[Path], expiry: int, uncompress: bool) -> tuple[str, SessionInfo]:
        """A new session holding ``files`` (one archive unpacked when ``uncompress``), built in a staging folder
        and renamed into place; :class:`archives.ArchiveRefused` leaves nothing behind."""
        session_id = str(uuid.uuid1()).lower()
        os.makedirs(self.store_path, exist_ok=True)
        staging = Path(self.store_path) / f".staging-{session_id}"
        staging.mkdir()
        try:
            if uncompress and len(files) == 1:
                archives.unpack(files[0], staging / "data")
                image = staging / "data"
            elif len(files) == 1 and not files[0].is_dir():
                image = staging / files[0].name
                shutil.move(files[0], image)
            else:
                image = staging / "data"
                image.mkdir()
                for f in (p for src in files for p in (sorted(src.iterdir()) if src.is_dir() else [src])):
                    shutil.move(f, image / f.name)
            final = Path(self.store_path) / session_id
            info = SessionInfo()
            info.name, info.path, info.image = session_id, str(final), str(final / image.name)
            info.meta = {"owner": current_owner.get() or ""}
            info.create_ts = info.last_access_ts = int(time.time())
            expiry = expiry if expiry > 0 else self.expiry
            info.expiry = min(expiry, self.expiry)
            _atomic_write(staging / "meta.info", info.to_str())
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self[session_id] = info
        return session_id, info

    def _write_meta_info(self, session_id, session_info):
        _atomic_write(Path(self.store_path) / session_id / "meta.info", session_info.to_str())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------- the session endpoints' bodies
def _store() -> OwnedSessions:
    from monailabel.interfaces.utils.app import app_instance

    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(status_code=406, detail="sessions are not enabled on this server (MONAI_LABEL_SESSIONS)")
    return sessions


def _found(session_id: str, update_ts: bool = False) -> SessionInfo:
    info = _store().get_session(session_id, update_ts=update_ts)
    if info is None:
        raise HTTPException(status_code=404, detail=f"session {session_id!r} does not exist, has expired or "
                                                    "belongs to another user")
    return info


def check_file_name(name: str | None) -> str:
    """An upload's file name as the session will hold it: one safe path component."""
    base = os.path.basename((name or "").replace("\\", "/"))
    if not base or base in (".", "..") or "\0" in base or len(base.encode("utf-8", "surrogateescape")) > 255 \
            or base.startswith(".staging-") or base == "meta.info":
        raise HTTPException(status_code=400, detail=f"invalid upload file name {name!r}: give a plain file name")
    return base


def create_session(background_tasks, uncompress: bool = False, expiry: int = 0, files=None):
    """``PUT /session/``: the files saved under checked names in this request's temp folder, then
    :meth:`OwnedSessions.create`."""
    sessions = _store()
    files = [f for f in files or [] if f is not None]
    if not files:
        raise HTTPException(status_code=400, detail="a session needs at least one uploaded file (files=...)")
    limit = archives.ArchiveLimits.from_env().max_members
    if len(files) > limit:
        raise HTTPException(status_code=413, detail=f"more than {limit:,} files in one session "
                                                    "(MRANNOTATOR_ARCHIVE_MAX_MEMBERS)")
    received = Path(tempfile.mkdtemp(prefix="session-"))  # inside the request's own folder (uploads.py)
    try:
        saved = []
        for f in files:
            path = received / check_file_name(f.filename)
            with open(path, "wb") as out:
                shutil.copyfileobj(f.file, out)
            saved.append(path)
        try:
            session_id, info = sessions.create(saved, expiry, uncompress)
        except archives.ArchiveRefused as e:
            raise HTTPException(status_code=e.status, detail=f"session refused: {e.message}") from None
    finally:
        shutil.rmtree(received, ignore_errors=True)
    logger.info(f"session {session_id} created ({len(saved)} file(s), owner {info.meta.get('owner') or '-'})")
    return {"session_id": session_id, "session_info": public(info)}


def get_session(session_id: str, update_ts: bool = False, image: bool = False):
    info = _found(session_id, update_ts=update_ts)
    if not image:
        return public(info)
    if not os.path.isfile(info.image):
        raise HTTPException(status_code=409, detail=f"session {session_id!r} holds a folder of files, not one image "
                                                    "to download")
    from monailabel.utils.others.generic import get_mime_type

    return FileResponse(info.image, media_type=get_mime_type(info.image), filename=os.path.basename(info.image))


def remove_session(session_id: str):
    info = _found(session_id)
    _store().remove_session(session_id)
    return public(info)


def install() -> None:
    """The session store class and the session endpoints' bodies (looked up by name at call time)."""
    import monailabel.endpoints.session as endpoints
    import monailabel.interfaces.app as app_module

    app_module.Sessions = OwnedSessions  # MONAILabelApp._load_sessions builds the store from this name
    endpoints.create_session, endpoints.get_session, endpoints.remove_session = \
        create_session, get_session, remove_session
