"""Click and scribble correction of one structure on top of the served model's probabilities.

    from mrannotator.refine import refine
    new = refine(image, labels, probability, label_id=1, foreground=[(40, 31, 12)], background=[(20, 50, 9)])

Arrays are in the voxel order of the image as stored (nibabel ``get_fdata()`` order, i, j, k); points are
(i, j, k) voxel indices; ``probability`` is the model's softmax for the structure (float in [0, 1], or
uint8 scaled by 255 as :mod:`mrannotator.probcache` keeps it); ``scribbles`` is 1 = foreground,
2 = background, 0 = none. Only structure ``label_id`` changes: its region is re-solved; it takes a voxel
from another structure only where the user's foreground says so (a click's sphere of influence or a
foreground scribble); every other voxel keeps its label.

Method (chosen by measurement on the phantoms; figures in README "Correct by clicking" and bench/README.md):
a binary graph cut (``numpymaxflow``, Boykov-Kolmogorov, 6-connectivity) on a crop around the structure.

- Unary: the model's log-odds, clipped to +-``MODEL_CLIP`` (the model is a prior, never a certainty), plus
  for each click a term of height ``CLICK_GAIN`` that decays as a Gaussian of the distance in mm. Its
  scale grows with the click's distance r to the edge of the model's region on the other side (a click in
  a thin boundary error moves about a voxel; a fixed 6-10 mm sphere measured wiping small organs out): up
  to ``NEAR_MM`` unconditionally and up to ``FAR_MM`` (2 r) over the connected region of voxels whose
  intensity is close to the click's (so one click fixes a region of the tissue clicked on, not one voxel,
  and does not spill over an edge). Where clicks compete, the nearest click's far term counts. Across a strong
  edge (``PV_EDGE`` noise SDs) that region also takes its partial-volume border: the image is blurred over about
  a voxel, so an organ's outermost voxels carry 20-40 % of the tissue beyond, fall outside the intensity
  tolerance, and were left for one click each (t1 site: a missed spleen took 18-20 clicks to 0.90, the border
  its only error); a border voxel nearer the click's intensity than the tissue beyond it is joined.
  Low-contrast edges (the hard site's vessels) are unchanged: there the tolerance already spans both sides.
  Clicked voxels and scribbles are hard seeds; each scribble stroke also acts as a click. Tubular structures
  (vessels) use a tighter tolerance and a reach stretched along the body (:mod:`mrannotator.refine_shape`).
- Pairwise: ``LAMDA * exp(-(I_p - I_q)^2 / 2 SIGMA^2)`` on the image divided by its noise level (robust MAD
  of neighbour differences), so the cut follows edges whatever the scanner's intensity scale.
- Crop: the structure's current region and the model's region (p > 0.5) grown by ``MARGIN_MM``, and each
  click's reach; crops over ``GRAPH_VOXELS`` are cut on 2 x 2 blocks along axes finer than ``FINE_MM``.
- A voxel of another structure is taken only under a foreground seed or where the net click term is over
  ``TAKE_FROM_OTHERS`` x ``CLICK_GAIN``; voxels of other structures never move otherwise.
- Locality: while every click is a boundary correction (each within ``NEAR_MM`` of the model region's edge, so
  the model is right about this structure but for its border), the voxels of the structure that the model is
  sure of (p >= ``KEEP_P``) and that no click reaches stay as they are. Without this the re-solve's edge term
  eroded thin structures far from the click (measured on good proposals in all regions: one click took a
  clavicle from Dice 0.95 to 0.57, and 43 of 90 structures were worse after 5 clicks than before; with it 21,
  bench/README.md "Clicks on good proposals"). A click deep in a region the model got wrong (a missed organ, a
  false one) releases this: then the whole crop is re-solved, which also cleans the model's false voxels away
  from the clicks.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .refine_shape import click_profile

MODEL_CLIP = 4.0  # |log-odds| of the model's probability, at most (p in [0.018, 0.982])
CLICK_GAIN = 10.0  # log-odds a click adds at its centre (beats any clipped model value)
NEAR_MM = 10.0  # unconditional sphere of influence of a click (Gaussian scale, mm)
FAR_MM = 30.0  # influence over the click's connected similar-intensity region (Gaussian scale, mm)
SIMILAR_NOISE = 4.5  # intensity tolerance around the click's intensity, in noise standard deviations
LAMDA = 4.0  # weight of the pairwise (edge) term against the unary (7 wiped out small organs on the easy site)
SIGMA = 2.5  # intensity difference (in noise standard deviations) that counts as an edge
REACH = 2.5  # a click acts within REACH x its Gaussian scale (the term is 0.044 x CLICK_GAIN there)
MARGIN_MM = 8.0  # the crop around the current and the model's region (clicks add their own reach)
GRAPH_VOXELS = 300_000  # a larger crop is cut on 2 x 2 blocks along its axes finer than FINE_MM
FINE_MM = 1.6
TAKE_FROM_OTHERS = 0.1  # a foreground click's term above this share of CLICK_GAIN may take another structure's voxel
KEEP_P = 0.9  # while every click is a boundary correction, voxels of the structure the model is this sure of ...
KEEP_OUTSIDE = 0.02  # ... stay where no click's term reaches this share of CLICK_GAIN (outside every click's reach)
PV_EDGE = 2 * SIMILAR_NOISE  # an edge (noise SDs) across which a click's region takes its partial-volume border
HARD = 30.0  # log-odds of a voxel that must not change (the graph cut's probabilities are clipped to 1e-7 anyway)


def refine(image: np.ndarray, labels: np.ndarray, probability: np.ndarray | None, label_id: int,
           foreground=(), background=(), scribbles: np.ndarray | None = None,
           spacing=(1.0, 1.0, 1.0), long_axis: int | None = None) -> np.ndarray:
    """A new label map in which only structure ``label_id`` is re-solved from the probability, the user's
    foreground / background points (i, j, k voxel indices) or ``scribbles`` (1 fg, 2 bg) and the image.

    ``long_axis``: the voxel axis along the body (:func:`mrannotator.refine_shape.long_axis_of`; None: the
    coarsest axis); a click on a tubular structure reaches further along it (:mod:`mrannotator.refine_shape`).

    Raises :class:`~mrannotator.errors.InputError` for a point outside the image, an unknown label id, no
    points and no scribbles, or arrays of different shapes.
    """
    image, labels, probability, scribbles, spacing = _check_arrays(image, labels, probability, scribbles, spacing)
    fg = _check_points(foreground, image.shape, "foreground")
    bg = _check_points(background, image.shape, "background")
    label_id = _check_label(label_id, labels)
    has_scribbles = scribbles is not None and bool(np.any(scribbles))
    if not fg and not bg and not has_scribbles:
        raise InputError("no foreground or background point and no scribble given: nothing to correct")

    current = labels == label_id
    prior = _prior(probability, current)
    if has_scribbles:  # each stroke also acts as a click at its middle voxel
        fg, bg = fg + _stroke_points(scribbles == 1), bg + _stroke_points(scribbles == 2)
    model_fg = prior > 0.5
    scales = _click_scales(fg, bg, model_fg, spacing)
    profile = click_profile(label_id, SIMILAR_NOISE, long_axis, spacing)
    reach_sp = profile.distance_spacing(spacing)
    box = _crop(current, prior, list(zip(fg + bg, scales, strict=True)), scribbles if has_scribbles else None, spacing,
                reach_sp)
    sl = tuple(slice(a, b) for a, b in box)
    img = image[sl].astype(np.float32)
    noise = _noise_level(img)
    logit = np.clip(_logit(prior[sl]), -MODEL_CLIP, MODEL_CLIP)
    offset = np.array([a for a, _ in box])
    signs = [1] * len(fg) + [-1] * len(bg)
    local = [(g, tuple(np.subtract(p, offset)), sc) for g, p, sc in zip(signs, fg + bg, scales, strict=True)]
    clicks = _click_terms(local, img, noise, reach_sp, profile.similar_noise)
    seeds_fg = np.zeros(img.shape, bool)
    seeds_bg = np.zeros(img.shape, bool)
    for p in fg:
        seeds_fg[tuple(np.subtract(p, offset))] = True
    for p in bg:
        seeds_bg[tuple(np.subtract(p, offset))] = True
    if has_scribbles:
        seeds_fg |= scribbles[sl] == 1
        seeds_bg |= scribbles[sl] == 2
        clicks += _scribble_term(seeds_fg, spacing) - _scribble_term(seeds_bg, spacing)
    unary = logit + clicks
    if all(near_s < NEAR_MM for near_s, _ in scales):  # boundary corrections only: the model is trusted elsewhere
        keep = (np.abs(clicks) <= KEEP_OUTSIDE * CLICK_GAIN) & current[sl] & (prior[sl] >= KEEP_P)
        unary[keep] = HARD
    region = (_graph_cut(img / noise, unary, spacing) | seeds_fg) & ~seeds_bg  # seeds are hard constraints

    out = labels.copy()
    crop_labels = out[sl]  # a view: writes go to out
    others = (crop_labels != label_id) & (crop_labels != 0)
    may_take = seeds_fg | (clicks > TAKE_FROM_OTHERS * CLICK_GAIN)
    add = region & (~others | may_take)
    crop_labels[(crop_labels == label_id) & ~region] = 0
    crop_labels[add] = label_id
    return out


def refine_segmentation(segmentation, image, structure, foreground=(), background=(),
                        scribbles: np.ndarray | None = None):
    """:func:`refine` on a :class:`~mrannotator.engine.Segmentation` (made with ``probabilities=True``) and its
    image (path, DICOM folder, nibabel or SimpleITK image): a new ``Segmentation`` with ``structure`` (catalogue
    name or id) corrected. Without the structure's probability (a segmentation made without probabilities)
    the current region serves as the prior.
    """
    from dataclasses import replace

    import nibabel as nib

    from .catalogue import load_catalogue
    from .imageio import load_image
    from .orientation import voxel_spacing
    from .refine_shape import long_axis_of

    img = load_image(image)
    labels = np.asanyarray(segmentation.labels.dataobj)
    if img.shape != labels.shape or not np.allclose(img.affine, segmentation.labels.affine, atol=1e-3):
        raise InputError(f"the image (shape {img.shape}) is not the one this segmentation was made on "
                         f"(shape {labels.shape} or another affine)")
    cat = load_catalogue()
    probs = segmentation.probabilities or {}
    known = {x.id: x for x in segmentation.structures}
    for i in probs:
        if i not in known and any(x.id == i for x in cat.structures):
            known[i] = cat.by_id(i)
    s = next((x for x in known.values() if structure in (x.name, x.id, str(x.id))), None)
    if s is None and isinstance(structure, str) and cat.find(structure) is not None:
        s = known.get(cat.find(structure).id)
    if s is None:
        raise InputError(f"unknown structure {structure!r}: this segmentation has "
                         f"{', '.join(x.name for x in known.values()) or 'none'}")
    new = refine(np.asanyarray(img.dataobj), labels, probs.get(s.id), s.id, foreground, background, scribbles,
                 voxel_spacing(img.affine), long_axis_of(img.affine))
    present = set(np.unique(new).tolist()) - {0}
    by_id = known
    return replace(segmentation, labels=nib.Nifti1Image(new.astype(np.uint8), segmentation.labels.affine,
                                                        segmentation.labels.header),
                   structures=[by_id[i] for i in sorted(present) if i in by_id])


# ------------------------------------------------------------------ input checks
def _check_arrays(image, labels, probability, scribbles, spacing):
    image = np.asanyarray(image)
    labels = np.asanyarray(labels)
    if image.ndim != 3:
        raise InputError(f"the image must be one 3D volume, got an array of shape {image.shape}")
    if labels.shape != image.shape:
        raise InputError(f"label map shape {labels.shape} differs from the image's {image.shape}")
    if probability is not None:
        probability = np.asanyarray(probability)
        if probability.shape != image.shape:
            raise InputError(f"probability shape {probability.shape} differs from the image's {image.shape}")
    if scribbles is not None:
        scribbles = np.asanyarray(scribbles)
        if scribbles.shape != image.shape:
            raise InputError(f"scribbles shape {scribbles.shape} differs from the image's {image.shape}")
        bad = set(np.unique(scribbles).tolist()) - {0, 1, 2}
        if bad:
            raise InputError(f"scribbles must be 0 (none), 1 (foreground) or 2 (background); found {sorted(bad)}")
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be three positive numbers (mm), got {spacing!r}") from None
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    return image, labels, probability, scribbles, spacing


def _check_points(points, shape, kind: str) -> list[tuple[int, int, int]]:
    if points is None:
        return []
    try:
        pts = [tuple(p) for p in points]
    except TypeError:
        raise InputError(f"{kind} points must be a list of [i, j, k] voxel indices, got {points!r:.200}") from None
    out = []
    for p in pts:
        if len(p) != 3 or not all(isinstance(v, int | np.integer | float | np.floating) for v in p):
            raise InputError(f"{kind} point {list(p)!r:.100} is not three voxel indices [i, j, k]")
        if not all(np.isfinite(float(v)) and float(v) == int(round(float(v))) for v in p):
            raise InputError(f"{kind} point {list(p)!r:.100} must be whole voxel indices")
        q = tuple(int(round(float(v))) for v in p)
        if not all(0 <= v < n for v, n in zip(q, shape, strict=True)):
            raise InputError(f"{kind} point {list(q)} is outside the image (voxel indices 0..{[n - 1 for n in shape]})")
        out.append(q)
    return out


def _check_label(label_id, labels: np.ndarray) -> int:
    try:
        value = int(label_id)
    except (TypeError, ValueError):
        raise InputError(f"label id must be a whole number 1-255, got {label_id!r:.100}") from None
    if value != label_id or not 1 <= value <= 255:
        raise InputError(f"label id must be a whole number 1-255, got {label_id!r:.100}")
    if labels.dtype.kind not in "iu" and not np.array_equal(labels, np.round(labels)):
        raise InputError("the label map must hold whole numbers")
    return value


# ------------------------------------------------------------------ terms
def _prior(probability: np.ndarray | None, current: np.ndarray) -> np.ndarray:
    """The structure's probability as float32 in [0, 1]; without one, the current region as a soft prior."""
    if probability is None:
        return np.where(current, np.float32(0.9), np.float32(0.1))
    if probability.dtype == np.uint8:
        return probability.astype(np.float32) / 255.0
    p = probability.astype(np.float32, copy=False)
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise InputError("probability must be finite values in [0, 1] (a softmax), or uint8 scaled by 255")
    return p


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _noise_level(img: np.ndarray) -> float:
    """Robust noise standard deviation: the MAD of neighbour differences along the first axis."""
    d = np.diff(img, axis=0) if img.shape[0] > 1 else np.diff(img.ravel())
    mad = float(np.median(np.abs(d - np.median(d)))) if d.size else 0.0
    sd = 1.4826 * mad / np.sqrt(2.0)
    if sd <= 0:
        sd = float(img.std()) * 0.05 or 1.0
    return sd


def _crop(current, prior, clicks, scribbles, spacing, reach_spacing) -> list[tuple[int, int]]:
    """Bounding box (start, stop per axis) of the region, the model's region and the scribbles grown by MARGIN_MM,
    and of each click's reach (``clicks``: (point, (near mm, far mm)); distances on ``reach_spacing``)."""
    shape, sp = current.shape, np.asarray(spacing)
    lo, hi = np.array(shape), np.zeros(3, int)
    grow = np.ceil(MARGIN_MM / sp).astype(int)
    for mask in (current, prior > 0.5, scribbles > 0 if scribbles is not None else None):
        if mask is None:
            continue
        idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        if all(len(i) for i in idx):
            lo = np.minimum(lo, np.subtract([i[0] for i in idx], grow))
            hi = np.maximum(hi, np.add([i[-1] + 1 for i in idx], grow))
    for p, (_, far_s) in clicks:
        reach = np.ceil(REACH * far_s / np.asarray(reach_spacing)).astype(int)
        lo = np.minimum(lo, np.subtract(p, reach))
        hi = np.maximum(hi, np.add(p, reach + 1))
    return [(int(max(0, a)), int(min(n, b))) for a, b, n in zip(lo, hi, shape, strict=True)]


def _click_scales(fg, bg, model_fg: np.ndarray, spacing) -> list[tuple[float, float]]:
    """(near, far) Gaussian scales in mm of each click (foreground, then background): the reach grows with the
    click's distance r (mm) to the nearest voxel the model puts on the other side (its region's boundary): a
    click in a thin boundary error reaches about a voxel, one in the middle of a missed organ NEAR_MM
    unconditionally and FAR_MM over its similar-intensity region."""
    from scipy import ndimage

    if not fg and not bg:
        return []
    edge = np.argwhere(model_fg & ~ndimage.binary_erosion(model_fg))
    out = []
    for sign, points in ((1, fg), (-1, bg)):
        for c in points:
            same_side = bool(model_fg[c]) == (sign > 0)  # the model already agrees with the click
            r = 0.0 if same_side else _distance_to(edge, c, spacing)
            near_s = min(NEAR_MM, max(float(min(spacing)), r))
            out.append((near_s, min(FAR_MM, max(near_s, 2.0 * r))))
    return out


def _click_terms(clicks, img: np.ndarray, noise: float, spacing, similar_noise: float) -> np.ndarray:
    """Net click log-odds at each voxel (positive: foreground); ``clicks``: (sign, point in crop coordinates,
    (near mm, far mm)). Near terms add up as the strongest of each side; a far term counts only where its click
    is the nearest of all clicks reaching there, so a background click next to a foreground click cannot wipe
    out the region the foreground click claimed.
    """
    near = {1: np.zeros(img.shape, np.float32), -1: np.zeros(img.shape, np.float32)}
    best_d2 = np.full(img.shape, np.inf, np.float32)
    far = np.zeros(img.shape, np.float32)  # signed far term of the nearest click
    for sign, c, (near_s, far_s) in clicks:
        box, d2, connected = _click_reach(c, img, noise, spacing, far_s, similar_noise)
        np.maximum(near[sign][box], np.exp(-d2 / (2 * near_s**2)), out=near[sign][box])
        closer = connected & (d2 < best_d2[box])
        best_d2[box][closer] = d2[closer]
        far[box][closer] = sign * np.exp(-d2[closer] / (2 * far_s**2))
    signed_near = near[1] - near[-1]
    return CLICK_GAIN * np.where(np.abs(signed_near) >= np.abs(far), signed_near, far)


def _distance_to(voxels: np.ndarray, c, spacing) -> float:
    """Distance (mm) from voxel ``c`` to the nearest of ``voxels`` (N x 3 indices; infinite when there are none)."""
    if not len(voxels):
        return float("inf")
    d2 = (((voxels - np.asarray(c)) * np.asarray(spacing, np.float32)) ** 2).sum(axis=1)
    return float(np.sqrt(d2.min()))


def _click_reach(c, img: np.ndarray, noise: float, spacing, far_mm: float, similar_noise: float):
    """(box around click ``c``, squared mm distance to it in the box, its connected region within
    ``similar_noise`` noise SDs of its intensity)."""
    from scipy import ndimage

    sp = np.asarray(spacing, np.float32)
    reach = np.ceil(REACH * far_mm / sp).astype(int)
    box = tuple(slice(max(0, v - r), min(n, v + r + 1)) for v, r, n in zip(c, reach, img.shape, strict=True))
    local = img[box]
    centre = tuple(v - b.start for v, b in zip(c, box, strict=True))
    grids = np.ogrid[tuple(slice(0, n) for n in local.shape)]
    d2 = sum(((g - v) * s) ** 2 for g, v, s in zip(grids, centre, sp, strict=True)).astype(np.float32)
    nb = tuple(slice(max(0, v - 1), v + 2) for v in centre)
    ref = float(np.median(local[nb]))
    similar = ndimage.binary_opening(np.abs(local - ref) <= similar_noise * noise) | _point_mask(local.shape, centre)
    comp, _ = ndimage.label(similar)
    return box, d2, _with_partial_volume(comp == comp[centre], local, ref, noise)


def _with_partial_volume(region: np.ndarray, local: np.ndarray, ref: float, noise: float) -> np.ndarray:
    """``region`` (a click's connected similar-intensity region in ``local``) and the voxels just outside it that
    are partial volume of the clicked tissue: across a real edge (the tissue beyond differs from the click's
    intensity ``ref`` by at least PV_EDGE noise SDs) a border voxel mixes both, and it belongs to the clicked
    tissue when its intensity is nearer ``ref`` than the tissue beyond it (the mean of its 6-neighbours outside
    the region and its border): more than half of it is the clicked tissue."""
    from scipy import ndimage

    found = ndimage.find_objects(region.astype(np.uint8))
    if not found or found[0] is None:
        return region
    # only the region's bounding box grown by 2 voxels can change (a 6-neighbour beyond its border is 2 away)
    sub = tuple(slice(max(0, a.start - 2), min(n, a.stop + 2)) for a, n in zip(found[0], region.shape, strict=True))
    out = region.copy()
    out[sub] = _border_mixed(region[sub], local[sub], ref, noise)
    return out


def _border_mixed(region: np.ndarray, local: np.ndarray, ref: float, noise: float) -> np.ndarray:
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(3, 1)
    grown = ndimage.binary_dilation(region, cross)
    border, beyond = grown & ~region, ~grown
    kernel = cross.astype(np.float32)
    kernel[1, 1, 1] = 0
    count = ndimage.correlate(beyond.astype(np.float32), kernel, mode="constant")
    outside = ndimage.correlate(np.where(beyond, local, 0).astype(np.float32), kernel, mode="constant")
    outside /= np.maximum(count, 1)
    mixed = (border & (count > 0) & (np.abs(outside - ref) >= PV_EDGE * noise)
             & (np.abs(local - ref) < np.abs(local - outside)))
    return region | mixed


def _scribble_term(seeds: np.ndarray, spacing) -> np.ndarray:
    """CLICK_GAIN x a Gaussian of the distance (mm) to the nearest scribbled voxel, NEAR_MM scale."""
    from scipy import ndimage

    if not seeds.any():
        return np.zeros(seeds.shape, np.float32)
    d = ndimage.distance_transform_edt(~seeds, sampling=spacing)
    return (CLICK_GAIN * np.exp(-(d**2) / (2 * NEAR_MM**2))).astype(np.float32)


def _stroke_points(mask: np.ndarray, most: int = 20) -> list[tuple[int, int, int]]:
    """One voxel of each of the ``most`` largest connected strokes of ``mask``: its middle voxel in scan order."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if not n:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    out = []
    for k in np.argsort(-sizes)[:most]:
        idx = np.argwhere(lab == k + 1)
        out.append(tuple(int(v) for v in idx[len(idx) // 2]))
    return out


def _point_mask(shape, centre) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[centre] = True
    return m


def _graph_cut(img: np.ndarray, unary: np.ndarray, spacing) -> np.ndarray:
    """Min cut of the unary log-odds + contrast-sensitive pairwise term: the foreground mask.

    A crop over GRAPH_VOXELS is cut on 2 x 2 blocks along the axes finer than FINE_MM (means of the image and
    of the log-odds), and the result is repeated back: the max-flow time grows faster than the voxel count.
    """
    import numpymaxflow

    shape = img.shape
    f = [2 if img.size > GRAPH_VOXELS and s < FINE_MM else 1 for s in spacing]
    if f != [1, 1, 1]:
        img, unary = _block_mean(img, f), _block_mean(unary, f)
    p_fg = 1.0 / (1.0 + np.exp(-np.clip(unary, -30, 30)))
    prob = np.stack([1.0 - p_fg, p_fg]).astype(np.float32)
    np.clip(prob, 1e-7, 1 - 1e-7, out=prob)
    out = np.asarray(numpymaxflow.maxflow(img[None].astype(np.float32), prob, LAMDA, SIGMA, 6)).reshape(img.shape)
    for ax, k in enumerate(f):
        if k > 1:
            out = np.repeat(out, k, axis=ax)
    return out[: shape[0], : shape[1], : shape[2]] > 0.5


def _block_mean(a: np.ndarray, f) -> np.ndarray:
    pad = [(0, (-n) % k) for n, k in zip(a.shape, f, strict=True)]
    a = np.pad(a.astype(np.float32), pad, mode="edge")
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).mean(axis=(1, 3, 5))
