"""Synthetic MR phantoms: deterministic by seed, one generator per region.

Anatomy is defined analytically in patient coordinates (RAS+, millimetres: +x is the patient's right,
+y anterior, +z superior) and rasterised on a reference grid. Storage orientation is then chosen
losslessly: the voxel array is permuted / flipped and the affine follows, so every storage of one
phantom has exactly the same voxel centres and the same physical anatomy. ``oblique`` tilts the
patient in the scanner: the voxel array stays as stored in LAS and the affine gets a rotation.

Labels are catalogue ids (see :mod:`mrannotator.catalogue`); :func:`to_model_labels` maps them to a
model's dataset.json indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .catalogue import load_catalogue

# Storage presets: nibabel axis codes of the voxel axes (the direction each index increases to).
ORIENTATIONS = {
    "RAS": ("R", "A", "S"),
    "LPS": ("L", "P", "S"),
    "LAS": ("L", "A", "S"),
    "axial": ("L", "A", "S"),
    "axial_reversed": ("L", "A", "I"),  # slices stored head to feet
    "sagittal": ("A", "I", "L"),  # slice axis left-right
    "coronal": ("L", "I", "A"),  # slice axis anterior-posterior
    "oblique": ("L", "A", "S"),  # LAS voxels, tilted affine
}

# Region aliases: the spine generator covers C3-L5, the pelvis generator covers the prostate.
GENERATOR_OF_REGION = {
    "abdomen": "abdomen",
    "pelvis": "pelvis",
    "prostate": "prostate",
    "shoulder": "shoulder",
    "knee": "knee",
    "cervical_spine": "spine",
    "thoracic_spine": "spine",
    "lumbar_spine": "spine",
    "spine": "spine",
}

# MR-like tissue signal (arbitrary units, roughly a T2-weighted contrast)
TISSUE = {
    "air": 0.0,
    "fat": 620.0,
    "muscle": 260.0,
    "bone": 380.0,  # marrow of a bone (fatty, mid signal) ...
    "cortex": 60.0,  # ... inside a dark cortical rim
    "liver": 330.0,
    "spleen": 520.0,
    "kidney": 560.0,
    "fluid": 900.0,
    "vessel": 120.0,  # flow void
    "pancreas": 430.0,
    "gut": 470.0,
    "disc": 700.0,
    "prostate": 480.0,
}


@dataclass
class Phantom:
    region: str
    image: nib.Nifti1Image  # int16 MR-like intensities
    labels: nib.Nifti1Image  # uint8 catalogue ids
    structures: dict[int, str]  # catalogue id -> catalogue name, for the ids present


# ------------------------------------------------------------------ primitives (on RAS points)
def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def ellipsoid(pts, center, semi, rot=None):
    d = pts - np.asarray(center, float)
    if rot is not None:
        d = d @ rot  # rotate points into the body frame
    return (((d / np.asarray(semi, float)) ** 2).sum(-1)) <= 1.0


def capsule(pts, p0, p1, radius):
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    v = p1 - p0
    t = np.clip(((pts - p0) @ v) / (v @ v), 0.0, 1.0)
    closest = p0 + t[..., None] * v
    return ((pts - closest) ** 2).sum(-1) <= radius**2


def box(pts, center, half, rot=None):
    d = pts - np.asarray(center, float)
    if rot is not None:
        d = d @ rot
    return np.all(np.abs(d) <= np.asarray(half, float), axis=-1)


# ------------------------------------------------------------------ region anatomy
class _Scene:
    """Paints tissues and labels in order (later paint wins) on a set of RAS points."""

    def __init__(self, pts: np.ndarray, rng: np.random.Generator, signal: dict[str, float] | None = None):
        self.pts = pts
        self.rng = rng
        self.signal = signal or TISSUE  # tissue -> MR signal: the contrast (see mrannotator.sites)
        self.tissue = np.full(pts.shape[:-1], self.signal["air"], np.float32)
        self.labels = np.zeros(pts.shape[:-1], np.uint8)
        self.cat = load_catalogue()

    def j(self, scale=1.0):
        """Random jitter in mm."""
        return self.rng.uniform(-scale, scale)

    def paint(self, mask, tissue, label=None):
        self.tissue[mask] = self.signal[tissue] * self.rng.uniform(0.92, 1.08)
        if label is not None:
            self.labels[mask] = self.cat.get(label).id

    def bone(self, mask_fn, label, rim=2.5):
        """A bone: dark cortex shell with marrow inside; the label covers both."""
        outer = mask_fn(0.0)
        inner = mask_fn(-rim)
        self.tissue[outer] = self.signal["cortex"]
        self.tissue[inner] = self.signal["bone"] * self.rng.uniform(0.9, 1.1)
        if label is not None:
            self.labels[outer] = self.cat.get(label).id

    def body(self, semi_x, semi_y, center=(0.0, 0.0), fat=8.0):
        p = self.pts
        outer = ((p[..., 0] - center[0]) / semi_x) ** 2 + ((p[..., 1] - center[1]) / semi_y) ** 2 <= 1
        inner = ((p[..., 0] - center[0]) / (semi_x - fat)) ** 2 + (
            (p[..., 1] - center[1]) / (semi_y - fat)
        ) ** 2 <= 1
        self.tissue[outer] = self.signal["fat"]
        self.tissue[inner] = self.signal["muscle"]


def _abdomen(s: _Scene):
    p, j = s.pts, s.j
    s.body(142 + j(4), 106 + j(4))
    s.paint(ellipsoid(p, (0, 0, 0), (118, 85, 400)), "fat")
    s.paint(ellipsoid(p, (62 + j(4), 15 + j(4), 25 + j(4)), (60 + j(4), 55 + j(4), 48 + j(3))), "liver", "liver")
    s.paint(ellipsoid(p, (-70 + j(4), -25 + j(3), 35 + j(4)), (26, 36 + j(3), 40 + j(4))), "spleen", "spleen")
    s.paint(ellipsoid(p, (-35 + j(3), 35 + j(3), 45 + j(3)), (34, 24, 28)), "gut", "stomach")
    for side, sx in (("right", 1), ("left", -1)):
        s.paint(
            ellipsoid(p, (sx * (52 + j(3)), -50 + j(3), -20 + j(4)), (20, 17, 42 + j(3)), _rot("z", sx * 20)),
            "kidney",
            f"kidney_{side}",
        )
    s.paint(ellipsoid(p, (48 + j(3), 42 + j(3), -15 + j(3)), (13, 13, 22)), "fluid", "gallbladder")
    s.paint(ellipsoid(p, (-8 + j(3), 10 + j(2), 0 + j(3)), (55, 11, 12), _rot("z", 15)), "pancreas", "pancreas")
    s.paint(capsule(p, (-14, -38, -200), (-14 + j(2), -38, 200), 10 + j(1)), "vessel", "aorta")
    s.paint(capsule(p, (18, -34, -200), (18 + j(2), -34, 200), 11 + j(1)), "vessel", "inferior_vena_cava")
    s.paint(capsule(p, (-10, -30, 75), (-10, -30, 200), 7), "gut", "esophagus")
    # vertebral body and spinal canal in the midline, unlabelled in the abdomen model
    s.bone(lambda m: capsule(p, (0, -75, -200), (0, -75, 200), 20 + m), None)
    s.paint(capsule(p, (0, -100, -200), (0, -100, 200), 7), "fluid")


def _spine(s: _Scene):
    p, j = s.pts, s.j
    s.body(70, 140, center=(0, -40), fat=10)
    # vertebral levels from C3 (top) to L5: body radius and height grow caudally, discs between
    levels = [f"C{i}" for i in range(3, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
    z = 330.0 + j(8)
    # C2 / skull-base anchor above C3
    s.bone(lambda m: ellipsoid(p, (0, 0, z + 22), (14 + m, 13 + m, 16 + m)), None)
    s.paint(capsule(p, (0, -22, -400), (0, -22, 400), 7), "fluid")  # spinal canal
    for k, lv in enumerate(levels):
        f = k / (len(levels) - 1)
        h = 12 + 14 * f  # body height, mm
        r = 10 + 12 * f  # body half-width
        d = 8 + 8 * f  # body half-depth
        disc = 4 + 5 * f
        zc = z - h / 2
        name = f"vertebrae_{lv}"

        def vert(m, zc=zc, h=h, r=r, d=d, lv=lv):
            m0 = box(p, (0, 0, zc), (r + m, d + m, h / 2 + m))
            spin = box(p, (0, -d - 16, zc - 2), (3 + m, 10 + m, h / 3 + m), _rot("x", 25))
            lam = box(p, (0, -d - 5, zc), (r * 0.6 + m, 4 + m, h / 3 + m))
            out = m0 | spin | lam
            if lv.startswith("T"):  # rib heads: thoracic levels only
                out |= capsule(p, (-r, -d, zc), (-r - 22, -d - 8, zc - 4), 4 + m)
                out |= capsule(p, (r, -d, zc), (r + 22, -d - 8, zc - 4), 4 + m)
            if lv.startswith("C"):  # transverse processes with foramina look: small lateral knobs
                out |= ellipsoid(p, (r + 4, -2, zc), (4 + m, 4 + m, 4 + m))
                out |= ellipsoid(p, (-r - 4, -2, zc), (4 + m, 4 + m, 4 + m))
            return out

        s.bone(vert, name, rim=2.0)
        z = zc - h / 2 - disc
        s.paint(box(p, (0, 0, z + disc / 2), (r, d, disc / 2 - 0.5)), "disc")
    # sacrum anchor below L5
    s.bone(lambda m: ellipsoid(p, (0, -10, z - 30), (30 + m, 18 + m, 30 + m), _rot("x", 30)), None)


def _shoulder(s: _Scene):
    p, j = s.pts, s.j
    # left/right symmetric body: trunk, neck and both arms; only the labels differ between sides
    s.body(150, 90, fat=10)
    s.paint(capsule(p, (0, 0, 60), (0, 0, 200), 50), "muscle")
    dz = j(4)
    for side, sx in (("right", 1.0), ("left", -1.0)):
        hx = sx * (160 + j(3))
        s.paint(capsule(p, (hx, 0, -150), (hx, 0, 10), 38), "muscle")  # arm / deltoid
        s.bone(lambda m, hx=hx, sx=sx: ellipsoid(p, (hx, 5, dz), (24 + m, 24 + m, 26 + m))
               | capsule(p, (hx, 5, dz), (hx + sx * 4, 5, -150), 12 + m), f"humerus_{side}")
        s.bone(lambda m, sx=sx: capsule(p, (sx * 25, 35, 55 + dz), (sx * 135, 15, 45 + dz), 8 + m),
               f"clavicle_{side}")
        s.bone(lambda m, sx=sx, hx=hx: ellipsoid(p, (sx * 100, -50, -15 + dz), (42 + m, 7 + m, 62 + m),
                                                 _rot("z", sx * 25))
               | ellipsoid(p, (hx - sx * 34, -5, dz), (9 + m, 16 + m, 18 + m))
               | capsule(p, (sx * 105, -42, 45 + dz), (hx - sx * 12, 0, 40 + dz), 6 + m), f"scapula_{side}")
    s.bone(lambda m: capsule(p, (0, -55, -200), (0, -55, 200), 16 + m), None)  # spine, midline


def _knee(s: _Scene):
    p, j = s.pts, s.j
    sx = 1.0 if s.rng.random() < 0.5 else -1.0  # right or left knee (labels have no side)
    s.paint(capsule(p, (0, 0, -200), (0, 0, 200), 62 + j(3)), "fat")
    s.paint(capsule(p, (0, -5, -200), (0, -5, 200), 55), "muscle")
    s.paint(ellipsoid(p, (0, 0, 0), (45, 38, 14)), "fluid")  # joint space
    s.bone(lambda m: capsule(p, (0, 0, 25), (j(2), 0, 200), 17 + m)
           | ellipsoid(p, (sx * 18, -5, 18), (18 + m, 26 + m, 20 + m))
           | ellipsoid(p, (-sx * 18, -5, 18), (18 + m, 26 + m, 20 + m)), "femur")
    s.bone(lambda m: ellipsoid(p, (0, -2, -18), (40 + m, 30 + m, 12 + m))
           | capsule(p, (0, -2, -20), (j(2), -4, -200), 17 + m), "tibia")
    s.bone(lambda m: capsule(p, (sx * 34, -18, -30), (sx * 36, -20, -200), 7 + m), "fibula")
    s.bone(lambda m: ellipsoid(p, (0, 45 + j(2), 22 + j(3)), (20 + m, 9 + m, 22 + m)), "patella")


def _pelvis(s: _Scene, prostate_only=False):
    p, j = s.pts, s.j
    s.body(175, 118, fat=14)
    s.paint(ellipsoid(p, (0, 30, 10), (45, 35, 35)), "fluid")  # bladder
    s.paint(capsule(p, (0, -40, -60), (0, -45, 40), 14), "gut")  # rectum
    s.paint(ellipsoid(p, (j(2), 15 + j(2), -45 + j(2)), (20 + j(2), 16, 18)), "prostate", "prostate")
    if prostate_only:
        return
    s.bone(lambda m: ellipsoid(p, (0, -75, 35), (42 + m, 18 + m, 50 + m), _rot("x", -30)), "sacrum")

    def pelvis(m):
        out = np.zeros(p.shape[:-1], bool)
        for sx in (1.0, -1.0):
            out |= ellipsoid(p, (sx * 95, -40, 58), (45 + m, 10 + m, 46 + m), _rot("z", sx * 40))  # iliac wing
            out |= ellipsoid(p, (sx * 88, -10, -5), (22 + m, 26 + m, 24 + m))  # acetabulum
            out |= capsule(p, (sx * 80, 5, -20), (sx * 12, 45, -50), 9 + m)  # pubic ramus
            out |= capsule(p, (sx * 80, -20, -25), (sx * 45, 10, -75), 10 + m)  # ischium
        return out

    s.bone(pelvis, "pelvis")
    for sx in (1.0, -1.0):
        hx = sx * (98 + j(2))
        s.bone(lambda m, hx=hx, sx=sx: ellipsoid(p, (hx, -10, -8), (21 + m, 21 + m, 21 + m))
               | capsule(p, (hx, -10, -8), (hx + sx * 35, -10, -45), 12 + m)
               | capsule(p, (hx + sx * 35, -10, -45), (hx + sx * 40, -10, -200), 15 + m), "upper_femora")


# field of view (mm, along R, A, S), spacing (mm, along R, A, S), FOV centre (RAS mm), anatomy
REGION_GRIDS = {  # in the order reports list the generators (seeding uses the sorted names, not this order)
    "abdomen": ((301, 231, 168), (3.5, 3.5, 6.0), (0, 0, 0), _abdomen),
    "pelvis": ((380, 264, 220), (4.0, 6.0, 4.0), (0, 0, 0), _pelvis),
    "prostate": ((128, 128, 96), (2.0, 2.0, 4.0), (0, 10, -45), lambda s: _pelvis(s, prostate_only=True)),
    "shoulder": ((448, 196, 240), (4.0, 5.0, 4.0), (0, 0, 0), _shoulder),
    "knee": ((160, 160, 192), (4.0, 3.0, 4.0), (0, 0, 0), _knee),
    "spine": ((64, 120, 704), (4.0, 3.0, 4.0), (0, 0, 0), _spine),
}
GENERATORS = tuple(REGION_GRIDS)  # every phantom generator


def _bias_field(shape, rng):
    """Smooth multiplicative coil-sensitivity field (low-order polynomial, +-20%)."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    g = np.meshgrid(*axes, indexing="ij")
    field = np.ones(shape, np.float32)
    for k in range(3):
        field += rng.uniform(-0.12, 0.12) * g[k] + rng.uniform(-0.06, 0.06) * g[k] ** 2
    return field


def _blur(vol: np.ndarray, sigma_vox) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(vol, sigma_vox)


def make_phantom(region: str, seed: int = 0, orientation: str = "LAS", oblique_deg: float = 12.0,
                 contrast: dict[str, float] | None = None) -> Phantom:
    """A phantom of ``region`` (see :data:`GENERATOR_OF_REGION`) stored in ``orientation``.

    ``contrast`` maps every tissue of :data:`TISSUE` to its signal (default: :data:`TISSUE`, the contrast the
    demo models were trained on); the anatomy and the random draws of a seed do not depend on it.
    """
    if contrast is not None and set(contrast) != set(TISSUE):
        raise ValueError(f"contrast must give a signal for exactly these tissues: {sorted(TISSUE)}")
    try:
        gen = GENERATOR_OF_REGION[region]
    except KeyError:
        raise ValueError(
            f"no phantom generator for region {region!r}; choose from {sorted(GENERATOR_OF_REGION)}"
        ) from None
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; choose from {sorted(ORIENTATIONS)}")
    fov, spacing, centre, paint = REGION_GRIDS[gen]
    rng = np.random.default_rng([seed, sorted(REGION_GRIDS).index(gen)])
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing, strict=True))
    # reference grid: RAS voxel axes, centred on the origin
    ras_affine = np.diag([*spacing, 1.0])
    ras_affine[:3, 3] = [c - (n - 1) * sp / 2 for n, sp, c in zip(shape, spacing, centre, strict=True)]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    pts = idx * np.asarray(spacing, np.float32) + ras_affine[:3, 3].astype(np.float32)

    scene = _Scene(pts, rng, contrast)
    paint(scene)
    # partial-volume blur, coil bias, Rician-like noise; int16 storage like a scanner
    img = _blur(scene.tissue, 0.6) * _bias_field(shape, rng)
    sigma = rng.uniform(12, 25)
    img = np.hypot(img + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    img = np.clip(img * rng.uniform(0.8, 1.25), 0, 32000).astype(np.int16)
    labels = scene.labels

    # losslessly store in the requested orientation (same voxel centres, same anatomy)
    ornt_from = nib.orientations.axcodes2ornt(("R", "A", "S"))
    ornt_to = nib.orientations.axcodes2ornt(ORIENTATIONS[orientation])
    tr = nib.orientations.ornt_transform(ornt_from, ornt_to)
    img = nib.orientations.apply_orientation(img, tr)
    labels = nib.orientations.apply_orientation(labels, tr)
    affine = ras_affine @ nib.orientations.inv_ornt_aff(tr, shape)
    if orientation == "oblique":
        rot = np.eye(4)
        rot[:3, :3] = _rot("x", oblique_deg) @ _rot("z", oblique_deg / 2)
        affine = rot @ affine
    image = nib.Nifti1Image(np.ascontiguousarray(img), affine)
    label_img = nib.Nifti1Image(np.ascontiguousarray(labels).astype(np.uint8), affine)
    for im in (image, label_img):
        im.set_qform(affine, code=1)
        im.set_sform(affine, code=1)
    cat = load_catalogue()
    present = {int(v): cat.by_id(int(v)).name for v in np.unique(labels) if v}
    return Phantom(region=gen, image=image, labels=label_img, structures=present)


def in_larger_field_of_view(image: nib.Nifti1Image, factors=(3, 2, 1)) -> nib.Nifti1Image:
    """The image at the first corner of a volume ``factors`` times its size, filled with its minimum.

    Same voxel grid origin and spacing (the affine is kept): an image that spans several patches of every
    model, with the anatomy where it was.
    """
    d = np.asarray(image.dataobj)
    big = np.full(tuple(n * f for n, f in zip(d.shape, factors, strict=True)), d.min(), d.dtype)
    big[tuple(slice(0, n) for n in d.shape)] = d
    return nib.Nifti1Image(big, image.affine)


def to_model_labels(catalogue_labels: np.ndarray, dataset_labels: dict[str, int]) -> np.ndarray:
    """Map catalogue ids to a model's dataset.json label values; structures it lacks become 0."""
    cat = load_catalogue()
    lut = np.zeros(256, np.uint8)
    for name, value in dataset_labels.items():
        if name == "background" or int(value) == 0:
            continue
        lut[cat.get(name).id] = int(value)
    return lut[catalogue_labels]
