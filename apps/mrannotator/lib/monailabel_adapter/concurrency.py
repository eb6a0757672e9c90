"""MONAI Label's routes run off the event loop: /info answers while inference and label saves run.

MONAI Label 0.8.5 declares every endpoint ``async def`` but calls blocking code in it (inference,
datastore writes, strategies, scoring): one infer blocks every other request (45 s measured with six
infers queued). :func:`offload_blocking_routes` makes each of MONAI Label's own API routes (the
``monailabel.endpoints`` modules) run its original endpoint, unchanged, in a worker thread (its
coroutine never awaits, so a private event loop in that thread drives it to the end). The route
keeps its path, parameters, dependencies (auth included) and OpenAPI entry.

- ``POST /infer/...``: one worker thread (the models predict one image at a time anyway) behind a
  bounded FIFO: requests run in arrival order; when ``infer_queue`` requests already wait, a new one
  gets 503 with ``Retry-After`` (seconds, from the mean infer time), before anything is read or stored.
- reads (GET/HEAD, /info included): their own threads, so a burst of writes cannot delay them.
- everything else (datastore writes, strategies, scoring, train start): a pool of ``workers`` threads.

Routes that do not block (MONAI Label's /auth, /proxy, /ohif and the app's own) are left as they are.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import HTTPException
from fastapi.routing import APIRoute

logger = logging.getLogger(__name__)

# MONAI Label's endpoint modules whose async handlers call blocking code
BLOCKING_MODULES = {f"monailabel.endpoints.{m}" for m in (
    "infer", "wsi_infer", "batch_infer", "train", "activelearning", "scoring", "datastore", "info", "model",
    "session", "logs")}
OFFLOADED = "_mrannotator_offloaded"


def _in_context(fn):
    """``fn`` run in the request's context: run_in_executor, unlike asyncio.to_thread, does not carry
    context variables over, and the adapter's per-request upload folder is one (monailabel_adapter)."""
    return functools.partial(contextvars.copy_context().run, fn)


class InferQueue:
    """One worker thread and a bounded FIFO in front of it; counts live on the event loop's thread."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrannotator-infer")
        self._in_queue = 0  # waiting + running; changed only on the event loop's thread
        self._mean_seconds = 5.0
        self._stats_lock = threading.Lock()

    def retry_after(self) -> int:
        return max(1, math.ceil(self._in_queue * self._mean_seconds))

    async def run(self, call):
        if self._in_queue > self.max_waiting:  # one runs, max_waiting wait
            raise HTTPException(status_code=503, headers={"Retry-After": str(self.retry_after())},
                                detail=f"{self._in_queue} inference requests are queued (limit "
                                       f"{self.max_waiting + 1}); retry in about {self.retry_after()} s")
        self._in_queue += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, _in_context(self._timed), call)
        finally:
            self._in_queue -= 1

    def _timed(self, call):
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            with self._stats_lock:  # running mean of the last ~10 infers, for Retry-After
                self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * (time.perf_counter() - t0)


class RoutePools:
    def __init__(self, infer_queue: int = 16, workers: int = 4, readers: int = 4):
        self.infer = InferQueue(infer_queue)
        self.writes = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mrannotator-work")
        self.reads = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="mrannotator-read")

    def submit_for(self, route: APIRoute):
        if "POST" in route.methods and route.path.startswith("/infer/"):
            return self.infer.run
        executor = self.reads if route.methods <= {"GET", "HEAD"} else self.writes

        async def submit(call):
            return await asyncio.get_running_loop().run_in_executor(executor, _in_context(call))

        return submit


def _in_worker_thread(endpoint, submit):
    @functools.wraps(endpoint)
    async def handler(*args, **kwargs):
        return await submit(lambda: asyncio.run(endpoint(*args, **kwargs)))

    setattr(handler, OFFLOADED, True)
    return handler


def api_routes(router) -> list[tuple[object, APIRoute]]:
    """(router, route) for every APIRoute of ``router``, also those of included routers (FastAPI 0.165
    keeps an included router as one ``_IncludedRouter`` entry holding the original router)."""
    out = []
    for route in router.routes:
        if isinstance(route, APIRoute):
            out.append((router, route))
        elif getattr(route, "original_router", None) is not None:
            out.extend(api_routes(route.original_router))
    return out


def offload_blocking_routes(fastapi_app=None, pools: RoutePools | None = None) -> list[str]:
    """Run MONAI Label's blocking routes as described above; returns ``METHOD path`` of each.

    ``fastapi_app`` defaults to MONAI Label's server app; in a train/scoring subprocess (no server)
    nothing is done. Calling it again changes nothing.

    How: the route's endpoint (what FastAPI builds an included route's handler from) and its
    ``dependant.call`` (what a handler already built calls) become a wrapper with the original's
    signature, so the route keeps its parameters, dependencies (auth included) and OpenAPI entry;
    FastAPI's cache of included routes is invalidated. Called before the first request (from the app's
    constructor, in MONAI Label's start-up). ``tests/test_server_load.py`` fails if this stops working.
    """
    if fastapi_app is None:
        module = sys.modules.get("monailabel.app")
        if module is None:
            return []
        fastapi_app = module.app
    pools = pools or RoutePools()
    changed = []
    routers = {}  # by id: routers are not hashable
    for router, route in api_routes(fastapi_app.router):
        endpoint = route.endpoint
        if getattr(endpoint, OFFLOADED, False) or not asyncio.iscoroutinefunction(endpoint):
            continue
        if getattr(endpoint, "__module__", None) not in BLOCKING_MODULES:
            continue
        handler = _in_worker_thread(endpoint, pools.submit_for(route))
        route.endpoint = handler
        route.dependant.call = handler
        routers[id(router)] = router
        changed.append(f"{','.join(sorted(route.methods))} {route.path}")
    for router in routers.values():  # FastAPI 0.165 rebuilds an included router's handlers when this changes
        if hasattr(router, "_routes_version"):
            router._routes_version += 1
    logger.info(f"running {len(changed)} MONAI Label routes in worker threads")
    return changed
