"""Logits back on the input grid one class channel at a time: labels and own-class probability, bounded memory.

Part of the nnU-Net adapter (its internals are listed in ``nnunet_adapter.INTERNALS``). Stock nnU-Net
(``convert_predicted_logits_to_segmentation_with_correct_shape``) resamples every class channel of the
low-resolution logits to the input grid at once: C x N float32 (N input voxels; 23 classes of a
512x512x200 MR are 4.8 GB), and with probabilities asked for, a softmax and a cropping copy of that
again. The merge of region models needs only each voxel's label and its own-class probability, so this
module computes exactly those, bit for bit what the stock route gives, while holding one channel:

- labels: nnU-Net resamples each channel on its own (``resample_data_or_seg`` loops over channels), so
  channel c is resampled alone with the same function and folded into a running argmax (strictly
  greater wins, so the first maximum wins as ``argmax`` does);
- own-class probability: needed only where the label is foreground. With linear (order <= 1)
  resampling a full-resolution value is a convex combination of low-resolution neighbours, so a voxel
  can only be foreground near a low-resolution voxel where background is not ahead by a margin; those
  candidates' channel values are gathered during the same pass (any foreground voxel outside them is
  gathered by a second pass: exact in every case, just slower);
- the softmax is torch's own kernel on the gathered values, in the arithmetic the whole-volume call
  used for each voxel: that kernel splits the voxels over nnU-Net's thread count and runs each split
  in SIMD vectors with a scalar tail, and the two differ in the last bit. :func:`softmax_at` repeats
  that split (vector voxels in full vectors, tail voxels one at a time); a self-check against the
  whole-volume call runs once per process and falls back to the stock route if it ever differs.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

MARGIN = 1e-3  # logits: background ahead of every class by more than this at every neighbour -> background


def _torch_threads() -> int:
    from nnunetv2.configuration import default_num_processes

    return int(default_num_processes)


def _vector_width() -> int:
    import torch

    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


def _scalar_voxels(idx: np.ndarray, n: int, threads: int, width: int) -> np.ndarray:
    """Which of the flat voxel indices ``idx`` torch's softmax computes in its scalar tail (the rest: vectors)."""
    chunk = -(-n // threads)
    begin = (idx // chunk) * chunk
    end = np.minimum(begin + chunk, n)
    return begin + ((idx - begin) // width + 1) * width > end


def softmax_at(values: np.ndarray, idx: np.ndarray, n: int, threads: int | None = None,
               width: int | None = None) -> np.ndarray:
    """torch.softmax over axis 0 at voxels ``idx`` of an (C, n) volume, given their values (C, len(idx)).

    Bit for bit what ``torch.softmax(volume, 0)`` run with ``threads`` threads gives at those voxels.
    """
    import torch

    threads = threads or _torch_threads()
    width = width or _vector_width()
    out = np.empty(values.shape, np.float32)
    scalar = _scalar_voxels(idx, n, threads, width)
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # one range: every voxel of a whole number of vectors takes the vector path
    try:
        vec = np.flatnonzero(~scalar)
        if vec.size:
            cols = np.concatenate([vec, np.full((-vec.size) % width, vec[0])])
            probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(values[:, cols])), 0).numpy()
            out[:, vec] = probs[:, :vec.size]
        for j in np.flatnonzero(scalar):  # fewer than width x threads voxels
            out[:, j] = torch.softmax(torch.from_numpy(np.ascontiguousarray(values[:, j:j + 1])), 0).numpy()[:, 0]
    finally:
        torch.set_num_threads(old)
    return out


@functools.cache
def softmax_emulation_holds() -> bool:
    """Once per process: :func:`softmax_at` equals torch's whole-volume softmax at every voxel of test volumes."""
    import torch

    rng = np.random.default_rng(0)
    threads = _torch_threads()
    old = torch.get_num_threads()
    try:
        for c, n in ((5, 40_009), (23, 7_777), (9, 1_000)):
            x = rng.normal(0, 6, (c, n)).astype(np.float32)
            torch.set_num_threads(threads)
            full = torch.softmax(torch.from_numpy(x), 0).numpy()
            torch.set_num_threads(old)
            idx = np.arange(n)
            if not np.array_equal(softmax_at(x, idx, n, threads), full):
                log.warning("torch's softmax is not computed as expected here: own-class probabilities fall back "
                            "to nnU-Net's whole-volume route (more memory)")
                return False
    finally:
        torch.set_num_threads(old)
    return True


def _candidates(logits: np.ndarray, resample) -> np.ndarray:
    """Flat indices (input grid, cropped) where a voxel may be foreground: near a low-resolution voxel where
    background is not ahead of every class by ``MARGIN`` (valid for linear resampling only)."""
    lead = logits[0] - logits[1:].max(0)
    near = (lead <= MARGIN * (1.0 + np.abs(logits[0]))).astype(np.float32)
    if not near.any():
        return np.zeros(0, np.intp)
    return np.flatnonzero(resample(near[None])[0] > 0)


def labels_and_confidence(pred, logits, props: dict, with_conf: bool):
    """(labels, own-class probability or None) on the input grid, x-y-z, from nnU-Net logits (C, z, y, x).

    Equal to ``convert_predicted_logits_to_segmentation_with_correct_shape`` (labels) and to its
    probabilities taken at each voxel's label; peak memory about one float32 channel of the input grid
    beyond the result, whatever the number of classes. None if this route does not apply (NaN logits,
    region-based labels, torch's softmax not as expected): the caller takes the stock route.
    """
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    lm, cm, pm = pred.label_manager, pred.configuration_manager, pred.plans_manager
    logits = torch.as_tensor(logits)
    if lm.has_regions or bool(torch.isnan(logits).any()) or (with_conf and not softmax_emulation_holds()):
        return None
    shape = props["shape_after_cropping_and_before_resampling"]
    spacing = [props["spacing"][i] for i in pm.transpose_forward]
    current = cm.spacing if len(cm.spacing) == len(shape) else [spacing[0], *cm.spacing]

    def resample(x):  # nnU-Net's own function, on some channels
        return cm.resampling_fn_probabilities(x, shape, current, spacing)

    linear = cm.configuration.get("resampling_fn_probabilities_kwargs", {}).get("order", 3) <= 1
    cand = _candidates(logits.float().numpy(), resample) if with_conf and linear else np.zeros(0, np.intp)
    seg, gathered = _argmax_pass(logits, resample, cand)
    conf = None
    if with_conf:
        conf = _own_probability(logits, resample, seg, cand, gathered)
    seg_full = np.zeros(props["shape_before_cropping"], np.uint8 if len(lm.foreground_labels) < 255 else np.uint16)
    seg_full = insert_crop_into_image(seg_full, seg, props["bbox_used_for_cropping"])
    seg_full = seg_full.transpose(pm.transpose_backward).transpose(2, 1, 0)
    if conf is not None:
        conf = insert_crop_into_image(np.zeros(props["shape_before_cropping"], np.float32), conf,
                                      props["bbox_used_for_cropping"])
        conf = conf.transpose(pm.transpose_backward).transpose(2, 1, 0)
    return seg_full, conf


def _argmax_pass(logits, resample, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running argmax over channels resampled one at a time; the channel values at ``cand`` gathered."""
    n_cls = logits.shape[0]
    best = np.asarray(resample(logits[0:1])[0], np.float32)
    seg = np.zeros(best.shape, np.uint8 if n_cls < 256 else np.uint16)
    gathered = np.empty((n_cls, cand.size), np.float32)
    gathered[0] = best.ravel()[cand]
    ahead = np.empty(best.shape, bool)
    for c in range(1, n_cls):
        r = resample(logits[c:c + 1])[0]
        np.greater(r, best, out=ahead)
        seg[ahead] = c
        np.copyto(best, r, where=ahead)
        gathered[c] = r.ravel()[cand]
        del r
    return seg, gathered


def _own_probability(logits, resample, seg: np.ndarray, cand: np.ndarray, gathered: np.ndarray) -> np.ndarray:
    """Softmax probability of each foreground voxel's own label (0 elsewhere), on the cropped input grid."""
    fg = np.flatnonzero(seg)
    missing = np.setdiff1d(fg, cand, assume_unique=True)
    if missing.size:  # not covered by the candidates (non-linear resampling): one more pass for these
        log.info("own-class probability: %d foreground voxels outside the candidates, second pass", missing.size)
        extra = np.stack([resample(logits[c:c + 1])[0].ravel()[missing] for c in range(logits.shape[0])])
        cand = np.concatenate([cand, missing])
        gathered = np.concatenate([gathered, extra], axis=1)
        order = np.argsort(cand, kind="stable")
        cand, gathered = cand[order], gathered[:, order]
    cols = np.searchsorted(cand, fg)
    probs = softmax_at(gathered[:, cols], fg, seg.size)
    conf = np.zeros(seg.shape, np.float32)
    conf.ravel()[fg] = probs[seg.ravel()[fg].astype(np.intp), np.arange(fg.size)]
    return conf


def convert(pred, logits, props: dict, output: str):
    """(labels, own-class probability or None, all probabilities or None), x-y-z, for ``output`` = "labels",
    "confidence" (labels + own-class probability: what a merge needs) or "probabilities" (stock route)."""
    from .nnunet_adapter import logits_to_labels

    if output != "probabilities":
        out = labels_and_confidence(pred, logits, props, output == "confidence")
        if out is not None:
            return (*out, None)
    seg, probs = logits_to_labels(pred, logits, props, output != "labels")
    conf = None if probs is None else np.take_along_axis(probs, seg[None].astype(np.intp), 0)[0]
    return seg, conf, probs
