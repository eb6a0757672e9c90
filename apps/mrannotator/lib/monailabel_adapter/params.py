"""Request parameters checked before MONAI Label acts on them (fix 13 of the package docstring).

Upstream (0.8.5):

- the ``params`` / ``info`` form fields of infer and the datastore routes go through ``json.loads`` and are
  used as dicts: a JSON list or number there (``request.update([1])``), or JSON nested a few thousand levels
  deep (``RecursionError`` in ``json.loads`` or in ``copy.deepcopy`` later) answers a bare 500. Here each
  such field must be a JSON object at most :data:`MAX_DEPTH` levels deep, and the keys the app reads
  (``image``, ``label_tag``, ``device``, ``result_extension``, ``result_dtype``: text; ``save_label``: a
  boolean) must have their type: 400 with the field and the problem.
- ``POST /train/{model}`` (and ``POST /train/``, per trainer) queues any ``max_epochs`` (``-1``, ``"abc"``)
  and answers 200; the training subprocess then fails (ERROR). Here every number the trainer's ``config()``
  declares must be given as a positive number of that kind: 400 before anything is queued.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

from .internals import tasks

MAX_DEPTH = 32
_TEXT_KEYS = ("image", "label_tag", "device", "result_extension", "result_dtype", "model")
_BOOL_KEYS = ("save_label",)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            return level
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def check_params(value: Any, field: str = "params") -> dict:
    """``value`` (parsed JSON of a form field or a body) as a dict; 400 naming the problem otherwise."""
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{field} must be a JSON object ({{...}}), "
                                                    f"not {type(value).__name__}")
    if _depth(value) > MAX_DEPTH:
        raise HTTPException(status_code=400, detail=f"{field} is nested more than {MAX_DEPTH} levels deep")
    for key in _TEXT_KEYS:
        if key in value and not isinstance(value[key], str):
            raise HTTPException(status_code=400, detail=f"{field}: {key!r} must be text, not "
                                                        f"{type(value[key]).__name__}")
    for key in _BOOL_KEYS:
        if key in value and not isinstance(value[key], bool):
            raise HTTPException(status_code=400, detail=f"{field}: {key!r} must be true or false")
    return value


class FormJSON:
    """Stands in for the ``json`` module in MONAI Label's endpoint modules: ``loads`` checks what it parses
    (:func:`check_params`); everything else is the json module's."""

    def __init__(self, field: str):
        self.field = field

    def loads(self, text, *args, **kwargs):
        try:
            value = json.loads(text, *args, **kwargs)
        except RecursionError:
            raise HTTPException(status_code=400, detail=f"{self.field} is nested too deeply") from None
        return check_params(value, self.field)

    def __getattr__(self, name):
        return getattr(json, name)


def check_train_params(model: str, params: Any) -> None:
    """400 for a training parameter the trainer would fail on (its ``config()`` numbers: positive)."""
    from monailabel.interfaces.utils.app import app_instance

    if params is None:
        return
    params = check_params(params, "training parameters")
    task = tasks(app_instance(), "trainers").get(model)
    defaults = task.config() if task is not None else {}
    for key, default in defaults.items():
        if key not in params or isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        raw, kind = params[key], type(default)
        try:
            value = kind(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None or (kind is int and isinstance(raw, float) and raw != int(raw)) or not value > 0:
            what = "a positive whole number" if kind is int else "a positive number"
            raise HTTPException(status_code=400, detail=f"training parameter {key}={raw!r}: expected {what}")


def install() -> None:
    import monailabel.endpoints.datastore as datastore
    import monailabel.endpoints.infer as infer
    import monailabel.endpoints.train as train

    infer.json = FormJSON("params")
    datastore.json = FormJSON("params/info")
    upstream = getattr(train.run_model, "upstream", train.run_model)

    def run_model(model, params=None, run_sync=False, enqueue=False):
        check_train_params(model, params)
        return upstream(model, params, run_sync, enqueue)

    run_model.upstream = upstream
    train.run_model = run_model
    upstream_all = getattr(train.run, "upstream", train.run)

    def run_all(params=None, run_sync=False):  # POST /train/: params per trainer name
        for model, model_params in (check_params(params, "training parameters") if params else {}).items():
            check_train_params(model, model_params)
        return upstream_all(params, run_sync)

    run_all.upstream = upstream_all
    train.run = run_all
