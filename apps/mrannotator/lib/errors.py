"""HTTP errors with a message the client shows (MONAI Label 0.8.5 turns any other exception into a bare 500)."""

from fastapi import HTTPException


def not_found(message: str) -> HTTPException:
    return HTTPException(status_code=404, detail=message)


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def unprocessable(message: str) -> HTTPException:
    """The request is well formed but the data in it (or the image it names) cannot be used."""
    return HTTPException(status_code=422, detail=message)


def server_error(message: str) -> HTTPException:
    return HTTPException(status_code=500, detail=message)


def conflict(message: str) -> HTTPException:
    """The request would undo what is stored (e.g. replace a labelled image) without being asked to."""
    return HTTPException(status_code=409, detail=message)
