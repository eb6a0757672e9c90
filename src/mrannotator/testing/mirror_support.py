"""The geometry matrix as DICOM series, OHIF-like mirrored SEGs and simulated honest corrections.

Used by tests/test_mirror_geometry.py, tests/test_mirror_check.py (a real Orthanc and server) and bench/mirror_check.py.

- :func:`matrix_series`: abdominal phantoms written as real DICOM series in every plane (axial,
  sagittal, coronal, oblique), instance numbers increasing or decreasing along the slice normal,
  head-first or feet-first; the phantom's labels are brought onto the grid the product reads.
- :func:`mirrored_seg`: a SEG as OHIF's export writes it on the affected series: the pixel frames in
  reverse slice order while each frame's position and ReferencedSOPInstanceUID are right (written with
  highdicom from the label reversed along the slice axis, segments MANUAL with catalogue codes).
- :func:`honest_correction`: an annotator's edit of a proposal (1-30 % of its labelled voxels):
  blobs added or removed, a structure dilated or eroded, deleted, or added.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from scipy import ndimage

from mrannotator.catalogue import load_catalogue
from mrannotator.dicom import stack_geometry
from mrannotator.imageio import LPS_TO_RAS
from mrannotator.phantoms import make_phantom
from mrannotator.testing.dicom_fixtures import read_series, write_series

# (plane, instance numbers along the slice normal: +1 increasing / -1 decreasing, patient position)
MATRIX = (
    ("axial", 1, "HFS"), ("axial", -1, "FFS"),
    ("sagittal", 1, "FFS"), ("sagittal", -1, "HFS"),
    ("coronal", 1, "HFS"), ("coronal", -1, "FFS"),
    ("oblique", 1, "FFS"), ("oblique", -1, "HFS"),
)


def case_name(plane: str, direction: int, position: str) -> str:
    return f"{plane}_{'inc' if direction > 0 else 'dec'}_{position.lower()}"


def _direction_of(img: nib.Nifti1Image) -> int:
    """+1 when the stored slice order goes along the DICOM slice normal (row cosine x column cosine)."""
    m = (LPS_TO_RAS @ img.affine)[:3, :3]
    normal = np.cross(m[:, 0], m[:, 1])
    return 1 if float(normal @ m[:, 2]) > 0 else -1


def _flip_slices(img: nib.Nifti1Image) -> nib.Nifti1Image:
    ornt = np.array([[0, 1], [1, 1], [2, -1]])
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def instance_direction(datasets) -> int:
    """+1 when InstanceNumber increases along the slice normal, -1 when it decreases."""
    order, _ = stack_geometry(datasets)  # slice order along the normal
    numbers = [int(datasets[i].InstanceNumber) for i in order]
    return 1 if numbers[-1] > numbers[0] else -1


def write_matrix_series(root: Path, plane: str, direction: int, position: str, seed: int, series_number: int,
                        study_uid: str) -> dict:
    """One matrix series: {dir, uid, datasets (slice order), volume, labels (on the volume's grid), direction}."""
    ph = make_phantom("abdomen", seed=seed, orientation=plane)
    image, labels = ph.image, nib.Nifti1Image(np.asanyarray(ph.labels.dataobj).astype(np.uint8), ph.image.affine)
    if _direction_of(image) != direction:
        image, labels = _flip_slices(image), _flip_slices(labels)
    folder = root / case_name(plane, direction, position)
    write_series(image, folder, study_instance_uid=study_uid, series_number=series_number,
                 series_description=f"T2 {case_name(plane, direction, position)}",
                 headers={"PatientPosition": position})
    datasets, volume = read_series(folder)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(labels.affine), nib.io_orientation(volume.affine))
    data = nib.orientations.apply_orientation(np.asanyarray(labels.dataobj), ornt)
    on_grid = nib.Nifti1Image(np.ascontiguousarray(data).astype(np.uint8), volume.affine)
    return {"dir": folder, "uid": str(datasets[0].SeriesInstanceUID), "datasets": datasets, "volume": volume,
            "labels": on_grid, "direction": instance_direction(datasets), "position": position}


def real_series(folder: Path) -> dict:
    """The bundled real series: {dir, uid, datasets, volume, direction}."""
    datasets, volume = read_series(folder)
    return {"dir": folder, "uid": str(datasets[0].SeriesInstanceUID), "datasets": datasets, "volume": volume,
            "direction": instance_direction(datasets), "position": str(datasets[0].get("PatientPosition", ""))}


def ras_centroid(img: nib.Nifti1Image, value: int) -> np.ndarray:
    """World centroid (RAS mm) of the voxels labelled ``value``."""
    ijk = np.argwhere(np.asanyarray(img.dataobj) == value).mean(axis=0)
    return nib.affines.apply_affine(img.affine, ijk)


def mirrored_seg(datasets, labels: nib.Nifti1Image) -> pydicom.Dataset:
    """The label as OHIF's export writes it on an affected series: frames reversed, positions right."""
    import highdicom as hd

    catalogue = load_catalogue()
    order, _ = stack_geometry(datasets)
    ordered = [datasets[i] for i in order]
    reversed_frames = np.asanyarray(labels.dataobj)[:, :, ::-1].transpose(2, 1, 0)  # frame k = slice n-1-k
    present = sorted(set(np.unique(reversed_frames).tolist()) - {0})
    masks, descriptions = [], []
    for n, sid in enumerate(present, 1):
        s = catalogue.by_id(sid)
        masks.append(reversed_frames == sid)
        d = hd.seg.SegmentDescription(
            segment_number=n, segment_label=s.display, segmented_property_category=hd.sr.CodedConcept(
                s.category.code, s.category.scheme, s.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(s.type.code, s.type.scheme, s.type.meaning),
            algorithm_type="MANUAL")
        if s.laterality is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(s.laterality.code, s.laterality.scheme, s.laterality.meaning)]
        descriptions.append(d)
    return hd.seg.Segmentation(
        source_images=ordered, pixel_array=np.stack(masks, -1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=950, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="OHIF-like export (test)", manufacturer_model_name="dcmjs", software_versions="0",
        device_serial_number="0", series_description="Segmentation", omit_empty_frames=True)


def _ball(shape, centre, radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def honest_correction(proposal: np.ndarray, kind: str, rng: np.random.Generator, share: float,
                      extra_id: int = 12) -> np.ndarray:
    """An annotator's correction of ``proposal``: one edit of the given kind, blobs sized to change about
    ``share`` of its labelled voxels (dilate / erode / delete change what the structure gives)."""
    out = proposal.copy()
    present = [int(v) for v in np.unique(proposal) if v]
    sizes = {v: int(np.count_nonzero(proposal == v)) for v in present}
    radius = (3 * share * int(np.count_nonzero(proposal)) / (4 * np.pi)) ** (1 / 3)
    target = int(rng.choice(present))
    if kind == "add_blob":
        centre = np.argwhere(proposal == target)[rng.integers(sizes[target])]
        out[_ball(proposal.shape, centre, radius) & (proposal == 0)] = target
    elif kind == "remove_blob":
        big = max(sizes, key=sizes.get)
        centre = np.argwhere(proposal == big)[rng.integers(sizes[big])]
        out[_ball(proposal.shape, centre, radius * 1.3) & (proposal == big)] = 0
    elif kind in ("dilate", "erode"):
        mask = proposal == target
        if kind == "dilate":
            out[ndimage.binary_dilation(mask, iterations=1) & (proposal == 0)] = target
        else:
            out[mask & ~ndimage.binary_erosion(mask, iterations=1)] = 0
    elif kind == "delete":
        out[proposal == target] = 0
    elif kind == "add_structure":
        centre = np.argwhere(proposal == 0)[rng.integers(np.count_nonzero(proposal == 0))]
        out[_ball(proposal.shape, centre, radius) & (proposal == 0)] = extra_id
    else:
        raise ValueError(f"unknown edit {kind!r}")
    return out


EDITS = ("add_blob", "remove_blob", "dilate", "erode", "delete", "add_structure")


def edited_share(before: np.ndarray, after: np.ndarray) -> float:
    """Share of the labelled voxels (before) that the edit changed."""
    return float(np.count_nonzero(before != after)) / max(1, int(np.count_nonzero(before)))
