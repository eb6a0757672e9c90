"""A cap on the bytes of an upload body (fix 11 of the package docstring).

Upstream: MONAI Label 0.8.5 copies every multipart upload (sessions, images, labels, infer files, model files)
to disk whatever its size; a session upload is never checked at all (images and labels are checked from their
header afterwards, lib/datastore.py). Here the body of every form route is counted as it arrives: a declared
``Content-Length`` over the cap, or a body that grows past it, is answered 413 before the rest is read.

Cap: ``MRANNOTATOR_UPLOAD_MAX_BYTES`` (default ``MRANNOTATOR_MAX_BYTES`` + 1 MiB for the multipart framing).
"""

from __future__ import annotations

from fastapi import HTTPException

from mrannotator.limits import Limits, positive_env_int


class UploadTooLarge(HTTPException):
    """Raised from the body stream; FastAPI re-raises an HTTPException met while parsing a form (413)."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"the upload is larger than {limit:,} bytes "
                                                  "(MRANNOTATOR_UPLOAD_MAX_BYTES)")


def max_upload_bytes() -> int:
    return positive_env_int("MRANNOTATOR_UPLOAD_MAX_BYTES", Limits.from_env().max_bytes + 2**20)


def capped(scope, receive):
    """``receive`` that raises :class:`UploadTooLarge` once the body (or its declared length) passes the cap."""
    limit = max_upload_bytes()
    declared = dict(scope.get("headers", [])).get(b"content-length", b"")
    seen = [0]

    async def counted():
        if declared.isdigit() and int(declared) > limit:
            raise UploadTooLarge(limit)
        message = await receive()
        if message.get("type") == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > limit:
                raise UploadTooLarge(limit)
        return message

    return counted
