"""Harder, honest "sites": abdomen phantoms with anatomical variation and acquisition shifts.

The easy new site of :mod:`mrannotator.sites` changes only the contrast; its phantoms differ from the
training phantoms by 2-4 mm. A hard site also varies the anatomy per case (each organ's size by up
to +-20 %, its position by up to 15 mm, the whole patient rotated by up to +-10 degrees in-plane,
organs missing after surgery) and images it with a protocol that per-image z-scoring cannot undo:
another tissue contrast, another in-plane resolution and slice thickness, another field of view, a
strong coil bias field, motion ghosting along the phase-encode axis and more noise.

    from mrannotator.hard_sites import make_hard_phantom
    ph, anatomy = make_hard_phantom(seed=3, site="hard_t1")

The anatomy drawn for a case is returned (:class:`Anatomy`) so a test can check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from .catalogue import load_catalogue
from .phantoms import Phantom, _rot, _Scene, capsule, ellipsoid
from .sites import SITES

ORGANS = ("liver", "spleen", "stomach", "kidney_right", "kidney_left", "gallbladder", "pancreas", "aorta",
          "inferior_vena_cava")
REMOVABLE = ("gallbladder", "spleen", "kidney_left", "kidney_right")  # cholecystectomy, splenectomy, nephrectomy
MAX_SCALE, MAX_SHIFT_MM, MAX_ROTATION_DEG = 0.20, 15.0, 10.0


@dataclass(frozen=True)
class Anatomy:
    scale: dict[str, float]  # organ -> size factor (1 +- MAX_SCALE)
    shift: dict[str, tuple[float, float, float]]  # organ -> displacement (RAS mm, norm <= MAX_SHIFT_MM)
    rotation_deg: float  # the whole patient, about the scanner's z axis
    missing: tuple[str, ...] = ()

    @staticmethod
    def neutral() -> Anatomy:
        return Anatomy({o: 1.0 for o in ORGANS}, {o: (0.0, 0.0, 0.0) for o in ORGANS}, 0.0)


@dataclass(frozen=True)
class Acquisition:
    contrast: str  # a key of mrannotator.sites.SITES
    spacing: tuple[float, float, float]  # mm along R, A, S (in-plane x2, slice thickness)
    fov: tuple[float, float, float]  # mm along R, A, S
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)  # FOV centre, RAS mm
    bias: float = 0.12  # amplitude of the linear bias terms (training phantoms: 0.12)
    ghosts: float = 0.0  # peak phase error (radians) of periodic motion along A-P (phase encode)
    noise: tuple[float, float] = (12.0, 25.0)  # Rician sigma range (training phantoms: 12-25)
    missing_rate: float = 0.15  # chance that each removable organ is absent
    description: str = ""
    extra: dict = field(default_factory=dict)


# the training grid of the abdomen model: 301 x 231 x 168 mm at 3.5 x 3.5 x 6 mm
HARD_SITES: dict[str, Acquisition] = {
    "hard_t1": Acquisition(
        "t1", (4.5, 4.5, 8.0), (315, 234, 176), bias=0.45, ghosts=0.6, noise=(30.0, 45.0),
        description="T1-like contrast, coarse 4.5 mm in-plane / 8 mm slices, strong bias, motion ghosts, noise"),
    "hard_t2_hires": Acquisition(
        "original", (1.5, 1.5, 4.0), (384, 384, 160), bias=0.45, ghosts=0.5, noise=(25.0, 40.0),
        description="training contrast, 1.5 mm in-plane / 4 mm slices, 384 mm FOV (256x256x40), strong bias, "
                    "motion ghosts, noise"),
    "shifted_t2": Acquisition(
        "original", (3.0, 3.0, 5.0), (300, 234, 170), bias=0.4, ghosts=0.45, noise=(25.0, 35.0),
        description="training contrast, 3 mm in-plane / 5 mm slices, strong bias, motion ghosts, noise"),
    "hard_t2_smallfov": Acquisition(
        "original", (2.5, 2.5, 5.0), (240, 200, 150), centre=(15.0, 5.0, 5.0), bias=0.45, ghosts=0.4,
        noise=(25.0, 40.0),
        description="training contrast, 2.5 mm / 5 mm, small off-centre FOV (body cut), strong bias, ghosts, "
                    "noise"),
}


def draw_anatomy(rng: np.random.Generator, missing_rate: float = 0.15) -> Anatomy:
    """Sizes, positions, rotation and missing organs of one case."""
    scale = {o: float(rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE)) for o in ORGANS}
    shift = {}
    for o in ORGANS:
        v = rng.normal(size=3)
        shift[o] = tuple(float(x) for x in v / np.linalg.norm(v) * rng.uniform(0, MAX_SHIFT_MM))
    missing = tuple(o for o in REMOVABLE if rng.random() < missing_rate)
    return Anatomy(scale, shift, float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)), missing)


def _paint_abdomen(s: _Scene, a: Anatomy) -> None:
    """The abdomen of :mod:`mrannotator.phantoms` with each organ scaled and moved as ``a`` says."""
    p, j = s.pts, s.j

    def c(organ, centre):
        return np.add(centre, a.shift[organ])

    def k(organ, semi):
        return np.multiply(semi, a.scale[organ])

    def organ(name, mask_fn, tissue, label=None):
        if name not in a.missing:
            s.paint(mask_fn(), tissue, label or name)

    s.body(142 + j(4), 106 + j(4))
    s.paint(ellipsoid(p, (0, 0, 0), (118, 85, 400)), "fat")
    organ("liver", lambda: ellipsoid(p, c("liver", (62, 15, 25)), k("liver", (60, 55, 48))), "liver")
    organ("spleen", lambda: ellipsoid(p, c("spleen", (-70, -25, 35)), k("spleen", (26, 36, 40))), "spleen")
    organ("stomach", lambda: ellipsoid(p, c("stomach", (-35, 35, 45)), k("stomach", (34, 24, 28))), "gut")
    for side, sx in (("right", 1), ("left", -1)):
        name = f"kidney_{side}"
        organ(name, lambda name=name, sx=sx: ellipsoid(p, c(name, (sx * 52, -50, -20)), k(name, (20, 17, 42)),
                                                       _rot("z", sx * 20)), "kidney")
    organ("gallbladder", lambda: ellipsoid(p, c("gallbladder", (48, 42, -15)), k("gallbladder", (13, 13, 22))),
          "fluid")
    organ("pancreas", lambda: ellipsoid(p, c("pancreas", (-8, 10, 0)), k("pancreas", (55, 11, 12)), _rot("z", 15)),
          "pancreas")
    for name, x, y, r in (("aorta", -14, -38, 10), ("inferior_vena_cava", 18, -34, 11)):
        dx, dy, _ = a.shift[name]
        organ(name, lambda x=x + dx, y=y + dy, r=r * a.scale[name]: capsule(p, (x, y, -200), (x, y, 200), r),
              "vessel")
    s.paint(capsule(p, (-10, -30, 75), (-10, -30, 200), 7), "gut", "esophagus")
    s.bone(lambda m: capsule(p, (0, -75, -200), (0, -75, 200), 20 + m), None)
    s.paint(capsule(p, (0, -100, -200), (0, -100, 200), 7), "fluid")


def _strong_bias(shape, rng, amplitude):
    """Multiplicative coil-sensitivity field: random linear + quadratic terms, floored at 0.15."""
    g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    f = np.ones(shape, np.float32)
    for ax in range(3):
        f += rng.uniform(-amplitude, amplitude) * g[ax] + rng.uniform(-amplitude, amplitude) / 2 * g[ax] ** 2
    return np.maximum(f, 0.15)


def motion_ghosts(img: np.ndarray, peak_rad: float, rng: np.random.Generator, axis: int = 1) -> np.ndarray:
    """Periodic (breathing) motion: a sinusoidal phase error per phase-encode line -> ghosts along ``axis``."""
    if peak_rad <= 0:
        return img
    n = img.shape[axis]
    period = rng.uniform(3.0, 6.0)  # breathing cycles over the acquisition: ghosts n / period lines apart
    ky = np.arange(n) - n // 2
    phase = peak_rad * np.sin(2 * np.pi * ky / (n / period) + rng.uniform(0, 2 * np.pi))
    shape = [1, 1, 1]
    shape[axis] = n
    k = np.fft.fftshift(np.fft.fft(img, axis=axis), axes=axis) * np.exp(1j * phase).reshape(shape)
    return np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis)).astype(np.float32)


def make_hard_phantom(seed: int, site: str = "hard_t1", anatomy: Anatomy | None = None) -> tuple[Phantom, Anatomy]:
    """An abdomen phantom of ``site`` (see :data:`HARD_SITES`), stored LAS; ``anatomy`` overrides the draw."""
    from scipy.ndimage import gaussian_filter

    try:
        acq = HARD_SITES[site]
    except KeyError:
        raise ValueError(f"unknown hard site {site!r}; choose from {sorted(HARD_SITES)}") from None
    rng = np.random.default_rng([seed, 7919])
    drawn = draw_anatomy(rng, acq.missing_rate)
    anatomy = anatomy or drawn
    shape = tuple(int(round(f / s)) for f, s in zip(acq.fov, acq.spacing, strict=True))
    origin = [c - (n - 1) * sp / 2 for n, sp, c in zip(shape, acq.spacing, acq.centre, strict=True)]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    pts = idx * np.asarray(acq.spacing, np.float32) + np.asarray(origin, np.float32)
    pts = pts @ _rot("z", anatomy.rotation_deg).astype(np.float32)  # the patient rotated in the scanner
    scene = _Scene(pts, rng, SITES[acq.contrast])
    _paint_abdomen(scene, anatomy)
    del pts, idx
    # partial-volume blur (0.6 voxel, so it grows with the voxel size), bias, ghosts, Rician noise; int16
    img = gaussian_filter(scene.tissue, 0.6) * _strong_bias(shape, rng, acq.bias)
    img = motion_ghosts(img, acq.ghosts, rng)
    sigma = rng.uniform(*acq.noise)
    img = np.hypot(img + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    img = np.clip(img * rng.uniform(0.8, 1.25), 0, 32000).astype(np.int16)
    # LAS storage like make_phantom's default: flip the R axis
    affine = np.diag([*acq.spacing, 1.0])
    affine[:3, 3] = origin
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = (shape[0] - 1)
    affine = affine @ flip
    img, labels = img[::-1], scene.labels[::-1]
    out = []
    for arr in (img, labels):
        im = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
        im.set_qform(affine, code=1)
        im.set_sform(affine, code=1)
        out.append(im)
    cat = load_catalogue()
    present = {int(v): cat.by_id(int(v)).name for v in np.unique(labels) if v}
    return Phantom(region="abdomen", image=out[0], labels=out[1], structures=present), anatomy
