"""Speed settings the engine applies by itself: allocator, precision.

- Exact mode (default) changes nothing numerical. It only stops glibc from returning every large
  activation buffer to the OS on free (``mallopt``: no mmap for big blocks while the network runs, no
  trimming); measured on a full-size nnU-Net on CPU, about 29 % of the time went to page faults without
  it. Labels stay identical. Input-grid arrays outside the network keep their own mappings (bounded memory).
- Fast mode is opt-in: bf16 autocast on CPUs that support bf16 natively (AVX512-BF16 / AMX), fp16
  autocast on CUDA, plain fp32 elsewhere; the network's first convolution and its segmentation heads
  stay in float32 (``nnunet_adapter.keep_edges_fp32``, applied by the engine). Labels may change where
  the top two class scores are close.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def tune_allocator() -> bool:
    """Keep freed heap blocks in the process (glibc only; large blocks in the heap only within
    :func:`network_allocation`); True if applied. Idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is None:  # musl or another libc: nothing to tune
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_MMAP_MAX, _M_MMAP_MAX_DEFAULT) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)


_M_MMAP_MAX_DEFAULT = 65536  # glibc's default: large blocks get their own mapping, unmapped on free


@contextlib.contextmanager
def network_allocation():
    """Within the block (the network's sliding window), large blocks come from the heap and stay there.

    Outside it, large blocks (input-grid arrays of preprocessing and export, hundreds of MB each) are mapped
    on their own and given back on free, so they never fragment the heap: measured on a 512x512x200 MR
    with four region models, keeping them in the heap grew the process by ~0.5 GB per model.
    """
    libc = _libc() if tune_allocator() else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _M_MMAP_MAX_DEFAULT)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def cpu_supports_bf16() -> bool:
    """Native bf16 matrix instructions on this CPU (bf16 autocast is slow without them)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def precision(mode: str, device) -> tuple[str, contextlib.AbstractContextManager]:
    """(label for reports, autocast context) for ``mode`` ('exact' or 'fast') on ``device``."""
    import torch

    if mode == "exact":
        return "exact", contextlib.nullcontext()
    if mode != "fast":
        raise ValueError(f"unknown mode {mode!r}: use 'exact' or 'fast'")
    if device.type == "cuda":
        return "fast (fp16)", torch.autocast("cuda", dtype=torch.float16)
    if cpu_supports_bf16():
        return "fast (bf16)", torch.autocast("cpu", dtype=torch.bfloat16)
    return "fast (fp32: no native bf16 on this CPU)", contextlib.nullcontext()


@contextlib.contextmanager
def count_network_calls(segmenter):
    """Within the block, count each region model's network calls (one per sliding-window tile).

    Yields a Counter keyed by dataset name, filled by forward hooks on nnU-Net's networks; the hooks are
    removed on exit.
    """
    from collections import Counter

    calls = Counter()
    hooks = [m.predictor.network.register_forward_hook(lambda mod, i, o, d=m.dataset: calls.update([d]))
             for m in segmenter.models]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()
