"""The PACS (a DICOMweb server such as Orthanc) as a dependency the server survives.

The server starts while the PACS is down and recovers by itself when it returns. Every call to the
PACS has a bounded wait (:data:`CONNECT_TIMEOUT_S`, :func:`read_timeout_s`) and no retry loop
(dicomweb_client retries 503s five times with exponential back-off by default). A failure becomes
:class:`PacsUnavailable`: 503 with a message naming the PACS and what to check, logged once per
outage without a traceback. After a failure the PACS is taken as down for :data:`RETRY_AFTER_S`
seconds, so the calls in between fail at once instead of each waiting for the timeout.

Credentials the PACS refuses (401/403) name ``MONAI_LABEL_DICOMWEB_USERNAME`` /
``MONAI_LABEL_DICOMWEB_PASSWORD``; they are never reported as a refused login (that is the
identity provider's answer, for the server's own users).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

import requests
from fastapi import HTTPException

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
# retrieving a whole series or storing a SEG may take a PACS longer to answer; callers probe first with a
# quick search, so a PACS that is down still answers 503 within the quick timeouts
TRANSFER_READ_TIMEOUT_S = 60.0
RETRY_AFTER_S = 3.0
CREDENTIALS = "MONAI_LABEL_DICOMWEB_USERNAME / MONAI_LABEL_DICOMWEB_PASSWORD"
# PACS answers that mean "not usable now" rather than "this request is wrong"
UNAVAILABLE = (401, 403, 502, 503, 504)


def read_timeout_s() -> float:
    """Longest silence from the PACS before giving up (``MRANNOTATOR_PACS_TIMEOUT_S``, default 2.5 s):
    connect + read stay under 5 s, the answer time the annotators were promised."""
    try:
        return max(0.5, float(os.environ.get("MRANNOTATOR_PACS_TIMEOUT_S", "") or 2.5))
    except ValueError:
        return 2.5


def timeouts() -> tuple[float, float]:
    return CONNECT_TIMEOUT_S, read_timeout_s()


class PacsUnavailable(HTTPException):
    """503: the PACS cannot be used now (down, too slow, or refusing the server's credentials)."""

    def __init__(self, message: str):
        super().__init__(status_code=503, detail=message, headers={"Retry-After": str(int(RETRY_AFTER_S))})

    def __str__(self) -> str:
        return str(self.detail)


def problem(url: str, error: BaseException | None = None, status: int | None = None) -> str:
    """What went wrong with the PACS at ``url`` and what to check, for a person."""
    if status in (401, 403):
        return (f"the PACS at {url} refused the server's credentials ({status}): check "
                f"{CREDENTIALS} (the PACS account the server uses)")
    if status is not None:
        return f"the PACS at {url} answered {status}; check the PACS's log"
    if isinstance(error, requests.Timeout):
        return (f"the PACS at {url} did not answer within {read_timeout_s():g} s; check that the PACS "
                "is running and not overloaded")
    return (f"the PACS at {url} cannot be reached ({type(error).__name__}); check that the PACS is "
            "running and that the server's --studies URL is right")


class PacsHealth:
    """Whether the PACS at ``url`` is taken as up; remembers the last failure for RETRY_AFTER_S."""

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._last: str | None = None

    def check(self) -> None:
        with self._lock:
            if self._last is not None and time.monotonic() < self._down_until:
                raise PacsUnavailable(self._last)

    def failed(self, message: str) -> PacsUnavailable:
        with self._lock:
            if self._last != message:  # once per outage (or per new kind of failure), no traceback
                logger.error(f"PACS unavailable: {message}")
            self._last = message
            self._down_until = time.monotonic() + RETRY_AFTER_S
        return PacsUnavailable(message)

    def ok(self) -> None:
        with self._lock:
            if self._last is not None:
                logger.warning(f"the PACS at {self.url} answers again")
            self._last = None
            self._down_until = 0.0

    @property
    def down(self) -> str | None:
        return self._last


def pacs_error(health: PacsHealth, e: BaseException) -> PacsUnavailable | None:
    """The PacsUnavailable for an exception of a PACS call, or None when it is no PACS failure."""
    if isinstance(e, PacsUnavailable):
        return e
    if isinstance(e, requests.HTTPError) and e.response is not None:
        status = e.response.status_code
        if status in UNAVAILABLE:
            return health.failed(problem(health.url, status=status))
        return None  # about the request itself (e.g. 404, or a 500 on one bad instance): the caller's business
    if isinstance(e, (requests.ConnectionError, requests.Timeout)):
        return health.failed(problem(health.url, e))
    return None


_health: dict[str, PacsHealth] = {}
_health_lock = threading.Lock()


def health_for(url: str) -> PacsHealth:
    """The one PacsHealth of the PACS at ``url`` in this process (the datastore and the proxy share it)."""
    key = url.rstrip("/")
    with _health_lock:
        return _health.setdefault(key, PacsHealth(key))


def is_transfer(name: str) -> bool:
    """Client methods that move whole series / instances (the long read timeout)."""
    return name == "store_instances" or (name.startswith(("retrieve_", "iter_")) and "metadata" not in name)


class GuardedClient:
    """A DICOMweb client whose calls fail fast while the PACS is down and raise PacsUnavailable;
    transfers go through ``transfer`` (same session, longer read timeout)."""

    def __init__(self, client, health: PacsHealth, transfer=None):
        self._wrapped = client
        self._transfer = transfer or client
        self.health = health

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._transfer if is_transfer(name) else self._wrapped, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            self.health.check()
            try:
                out = attr(*args, **kwargs)
            except Exception as e:
                error = pacs_error(self.health, e)
                if error is not None:
                    raise error from None
                if isinstance(e, requests.HTTPError) and e.response is not None:
                    # never a bare HTTPError: the app answers those as the identity provider refusing a login
                    raise HTTPException(status_code=502, detail=problem(self.health.url, status=e.response.status_code)
                                        ) from None
                raise
            self.health.ok()
            return out

        return call


def guarded_client(url: str, username: str = "", password: str = "", **prefixes) -> GuardedClient:
    """MONAI Label's DICOMweb client for ``url`` with bounded waits, no retry loop, and the guard above."""
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.datastore.dicom import DICOMwebClientX

    session = create_session_from_user_pass(username, password) if username and password else None
    clients = [DICOMwebClientX(url=url, session=session, timeout=t, **prefixes)
               for t in (timeouts(), (CONNECT_TIMEOUT_S, TRANSFER_READ_TIMEOUT_S))]
    for client in clients:
        client.set_http_retry_params(retry=False)
    return GuardedClient(clients[0], health_for(url), transfer=clients[1])
