"""Scanner "sites" for phantoms: the same anatomy under another tissue contrast.

The demo models were trained on :data:`mrannotator.phantoms.TISSUE`, a roughly T2-weighted contrast.
A new site images the same anatomy with a T1-weighted-like contrast (fat and marrow bright, fluid dark,
liver brighter than spleen, inflow-bright vessels): per-image z-scoring (nnU-Net's MR normalisation)
cannot undo a reordering of tissue signals, so a model that knows only the original contrast starts
poor there. Used by ``bench/annotation_study.py`` and ``tests/test_annotation_loop.py``.

    from mrannotator.sites import make_site_phantom
    ph = make_site_phantom("abdomen", seed=3, site="t1")
"""

from __future__ import annotations

from .phantoms import TISSUE, Phantom, make_phantom

# tissue -> signal (arbitrary units) per site; "original" is the demo models' training contrast
SITES: dict[str, dict[str, float]] = {
    "original": dict(TISSUE),
    "t1": {
        "air": 0.0,
        "fat": 900.0,
        "muscle": 300.0,
        "bone": 650.0,  # fatty marrow: bright on T1
        "cortex": 40.0,
        "liver": 540.0,
        "spleen": 360.0,
        "kidney": 400.0,
        "fluid": 90.0,  # bile, urine, CSF: dark on T1
        "vessel": 760.0,  # inflow-bright (gradient echo)
        "pancreas": 600.0,
        "gut": 230.0,
        "disc": 260.0,
        "prostate": 330.0,
    },
}


def make_site_phantom(region: str, seed: int = 0, site: str = "t1", orientation: str = "LAS") -> Phantom:
    """A phantom of ``region`` imaged with the contrast of ``site`` (see :data:`SITES`)."""
    try:
        contrast = SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; choose from {sorted(SITES)}") from None
    return make_phantom(region, seed=seed, orientation=orientation, contrast=contrast)
