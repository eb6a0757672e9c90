"""DICOM series <-> volume geometry, exactly, in both directions.

- :func:`write_series` writes a volume (nibabel image, RAS affine) as a real single-frame DICOM series
  (MR by default, CT for mixed-study tests): one instance per slice along the third voxel axis, in
  stored order, each with its own ImagePositionPatient and the shared ImageOrientationPatient, so
  axial, sagittal, coronal, oblique and reversed-order acquisitions are all written as acquired. The
  files pass ``dciodvfy`` (Debian dicom3tools) without errors.
- :func:`volume_from_datasets` turns the instances of one series (any order) back into a volume with
  the affine built from their own ImagePositionPatient / ImageOrientationPatient / PixelSpacing,
  never from the affine diagonal, and checks that the slices form one evenly spaced stack.

Voxel axes of a volume made here: i = column (increases along the row direction cosine), j = row,
k = slice (sorted along the slice normal), as SimpleITK / GDCM read series.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .errors import InputError
from .imageio import load_image

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# tolerances for "one evenly spaced stack of parallel slices" (mm and direction cosines)
_POS_TOL_MM = 1e-3
_COS_TOL = 1e-4


def _ds(value: float) -> str:
    """A DICOM Decimal String (at most 16 characters) that keeps as much precision as fits."""
    for digits in range(10, 0, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return "0" if s in ("-0", "0") else s
    raise ValueError(f"{value} does not fit a DICOM DS")


def _round(v: float) -> float:
    return float(_ds(v))


def _slice_geometry(affine_ras: np.ndarray):
    """(row cosine, column cosine, pixel spacing [row, col], slice step vector, origin), all LPS."""
    lps = _LPS_TO_RAS @ np.asarray(affine_ras, float)
    m = lps[:3, :3]
    sp = np.sqrt((m**2).sum(axis=0))
    u = m / sp  # unit columns: i (along a row), j (down a column), k (slice step)
    if abs(float(u[:, 0] @ u[:, 1])) > _COS_TOL:
        raise InputError("the volume's in-plane axes are not perpendicular (sheared affine); DICOM cannot hold it")
    normal = np.cross(u[:, 0], u[:, 1])
    if abs(abs(float(normal @ u[:, 2])) - 1.0) > _COS_TOL:
        raise InputError("the volume's slice axis is not perpendicular to its slices (gantry tilt / shear)")
    return u[:, 0], u[:, 1], (float(sp[1]), float(sp[0])), m[:, 2], lps[:3, 3]


def write_series(
    image,
    folder: str | Path,
    *,
    modality: str = "MR",
    patient_id: str = "MRA0001",
    patient_name: str = "Phantom^MRAnnotator",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "T2 3D",
    study_description: str = "MRAnnotator test study",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "OTHER"),
    body_part: str = "ABDOMEN",
    prefix: str | None = None,
) -> list[Path]:
    """Write ``image`` (a path, nibabel or SimpleITK image) as a DICOM series; returns the files.

    Slices follow the third voxel axis in stored order (instance number 1 = first stored slice), so a
    volume stored head-to-feet is written as a reversed-order acquisition. Integer intensities are
    written as they are (int16 or uint16); non-integral ones are refused rather than rounded.
    """
    img = load_image(image)
    data = np.asanyarray(img.dataobj)
    modality = modality.upper()
    if modality not in ("MR", "CT"):
        raise ValueError("write_series writes MR or CT series")
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise InputError("write_series stores integer intensities; round or rescale the volume first")
        data = data.astype(np.int64)
    lo, hi = int(data.min()), int(data.max())
    if lo >= 0 and hi <= 65535 and not (lo >= -32768 and hi <= 32767):
        pixels, signed = data.astype(np.uint16), 0
    elif lo >= -32768 and hi <= 32767:
        pixels, signed = data.astype(np.int16), 1
    else:
        raise InputError(f"intensities {lo}..{hi} do not fit 16 bits")

    row_cos, col_cos, spacing, step, origin = _slice_geometry(img.affine)
    thickness = float(np.linalg.norm(step))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_class = MR_IMAGE_STORAGE if modality == "MR" else CT_IMAGE_STORAGE
    prefix = prefix or f"{modality.lower()}{series_number:03d}"
    nx, ny, nz = pixels.shape
    files = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.ImageType = list(image_type)
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        # patient / study / series / equipment
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.StudyID = study_uid, "1"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time, ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, int(series_number)
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.SeriesDescription = series_description
        ds.Modality = modality
        ds.BodyPartExamined = body_part
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer = "MRAnnotator test fixtures"
        ds.ManufacturerModelName = "mrannotator.dicom.write_series"
        # image
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate, ds.ContentTime = date, time
        ds.PatientOrientation = ""
        position = origin + k * step
        ds.ImagePositionPatient = [_round(v) for v in position]
        ds.ImageOrientationPatient = [_round(v) for v in (*row_cos, *col_cos)]
        ds.SliceLocation = _round(float(position @ np.cross(row_cos, col_cos)))
        ds.SliceThickness = _round(thickness)
        ds.PixelSpacing = [_round(spacing[0]), _round(spacing[1])]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = signed
        frame = np.ascontiguousarray(pixels[:, :, k].T)  # rows = j, columns = i
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "3D"
            ds.SpacingBetweenSlices = _round(thickness)
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "1500", "100", "1"
            ds.MagneticFieldStrength = "1.5"
        else:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
            ds.KVP = "120"
        ds.PixelData = frame.tobytes()
        path = folder / f"{prefix}_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# ------------------------------------------------------------------ reading geometry back
def _vec(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = getattr(ds, keyword, None)
    if value is None or len(value) != n:
        raise InputError(f"DICOM instance {getattr(ds, 'SOPInstanceUID', '?')} has no usable {keyword}")
    return np.asarray([float(v) for v in value])


def sort_datasets(datasets: Sequence[Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """The instances of one series sorted along their slice normal, and the RAS affine of the stack.

    Raises :class:`InputError` when the instances are not one stack of parallel, evenly spaced slices
    of the same size (a localizer, a multi-stack series, missing slices).
    """
    if len(datasets) < 2:
        raise InputError("the series has a single slice; MRAnnotator needs a 3D series")
    iop = _vec(datasets[0], "ImageOrientationPatient", 6)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise InputError("ImageOrientationPatient does not hold two perpendicular unit vectors")
    shape = (int(datasets[0].Rows), int(datasets[0].Columns))
    spacing = _vec(datasets[0], "PixelSpacing", 2)  # [between rows, between columns]
    for ds in datasets[1:]:
        if not np.allclose(_vec(ds, "ImageOrientationPatient", 6), iop, atol=_COS_TOL):
            raise InputError("the series mixes slice orientations (e.g. a 3-plane localizer); not one 3D stack")
        if (int(ds.Rows), int(ds.Columns)) != shape or not np.allclose(_vec(ds, "PixelSpacing", 2), spacing):
            raise InputError("the series mixes slice sizes or pixel spacings; not one 3D stack")
    positions = np.array([_vec(ds, "ImagePositionPatient", 3) for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    step = steps.mean(axis=0)
    if np.linalg.norm(step) < _POS_TOL_MM:
        raise InputError("several slices share one position (multi-echo or multi-phase series?); split it first")
    if np.abs(steps - step).max() > max(_POS_TOL_MM, 1e-3 * np.linalg.norm(step)):
        gaps = np.linalg.norm(steps, axis=1)
        raise InputError(
            f"slices are not evenly spaced (gaps {gaps.min():.3f}..{gaps.max():.3f} mm: missing slices?)"
        )
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return [datasets[i] for i in order], _LPS_TO_RAS @ lps


def volume_from_datasets(datasets: Sequence[Dataset], slices: np.ndarray | None = None) -> nib.Nifti1Image:
    """A volume from the instances of one series: geometry from their own headers, exactly.

    ``slices``, when given, is the voxel data already decoded as (slice, row, column) in the order of
    ``datasets`` (as MONAI Deploy's series-to-volume operator delivers it); otherwise the pixel data
    of the datasets is decoded here (with the modality rescale).
    """
    ordered, affine = sort_datasets(datasets)
    index = {id(ds): n for n, ds in enumerate(datasets)}
    order = [index[id(ds)] for ds in ordered]
    if slices is None:
        from pydicom.pixels import apply_rescale

        arr = np.stack([apply_rescale(ds.pixel_array, ds) for ds in datasets])
    else:
        arr = np.asarray(slices)
        if arr.shape[0] != len(datasets):
            raise InputError(f"{arr.shape[0]} decoded slices for {len(datasets)} instances")
    arr = arr[order]
    vol = np.ascontiguousarray(arr.transpose(2, 1, 0))  # (slice, row, col) -> (i=col, j=row, k=slice)
    out = nib.Nifti1Image(vol, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def read_series(folder: str | Path) -> tuple[list[Dataset], nib.Nifti1Image]:
    """All instances of the single series in ``folder`` (sorted) and its volume; for tests and tools."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    datasets = [pydicom.dcmread(p) for p in files]
    uids = {ds.SeriesInstanceUID for ds in datasets}
    if len(uids) != 1:
        raise InputError(f"{folder} holds {len(uids)} series; give a folder of one series")
    vol = volume_from_datasets(datasets)
    ordered, _ = sort_datasets(datasets)
    return ordered, vol


# ------------------------------------------------------------------ DICOM SEG
ALGORITHM_NAME = "MRAnnotator"


def _code(c):
    from pydicom.sr.coding import Code

    return Code(c.code, c.scheme, c.meaning)


def make_seg(
    labels: nib.Nifti1Image,
    structures,
    source_datasets: Sequence[Dataset],
    *,
    weights: dict,
    model_creator: str = "MRAnnotator project",
    model_name: str = "MRAnnotator nnU-Net v2",
    model_version: str | None = None,
    device_uid: str | None = None,
    series_number: int | None = None,
):
    """A DICOM SEG (BINARY, empty frames omitted) of a catalogue label map on a series' own grid.

    ``labels`` must lie on the grid of ``source_datasets`` as :func:`volume_from_datasets` builds it
    (slice k = k-th instance along the slice normal). One segment per structure present, numbered in
    catalogue id order, with the catalogue's SNOMED category / type, laterality modifier and colour,
    the algorithm identification (name, version, weights used) and the model in the contributing
    equipment (Manufacturer, model name, version, Device UID), as IHE AIR asks.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    ordered, affine = sort_datasets(source_datasets)
    if not np.allclose(affine, labels.affine, atol=1e-3):
        raise ValueError("the label map does not lie on the grid of the source series")
    data = np.asanyarray(labels.dataobj)
    present = sorted({int(v) for v in np.unique(data)} - {0})
    by_id = {s.id: s for s in structures}
    missing = [v for v in present if v not in by_id]
    if missing:
        raise ValueError(f"label values {missing} have no catalogue structure")
    if not present:
        raise InputError("no structure was found in the series: there is nothing to put in a DICOM SEG")
    lut = np.zeros(256, np.uint8)
    for n, sid in enumerate(present, 1):
        lut[sid] = n
    frames = lut[data].transpose(2, 1, 0)  # (slice, row, column), slice order = ordered

    version = model_version or __version__
    models = ",".join(weights.get("models", []))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=version[:64],
        source=f"{weights.get('source', '?')} weights"[:64],
        parameters={"weights": str(weights.get("source", "?")), "models": models},
    )
    descriptions = []
    for n, sid in enumerate(present, 1):
        s = by_id[sid]
        d = hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=s.display[:64],
            segmented_property_category=_code(s.category),
            segmented_property_type=_code(s.type),
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
            tracking_id=s.name[:64],
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*s.color),
        )
        if s.laterality is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(s.laterality.code, s.laterality.scheme, s.laterality.meaning)
            ]
        descriptions.append(d)
    equipment = hd.ContributingEquipment(
        manufacturer=model_creator,
        # CID 7005 (DCM 109102); IHE AIR's placeholder (Newcode1, 99IHE) is not a valid DICOM code
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{model_name} ({weights.get('source', '?')} weights)"[:64],
        software_versions=version[:64],
    )
    src = ordered[0]
    number = series_number if series_number is not None else 1000 + int(getattr(src, "SeriesNumber", 0) or 0)
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=number % 2**31,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MRAnnotator",
        manufacturer_model_name="MRAnnotator",
        software_versions=__version__,
        device_serial_number="0",
        content_label="MRANNOTATOR",
        content_description=f"MRAnnotator automatic segmentation ({len(present)} structures)"[:64],
        series_description="MRAnnotator segmentation",
        omit_empty_frames=True,
        contributing_equipment=[equipment],
    )
    if device_uid:  # highdicom adds an item for itself: put the model's Device UID on the model's item
        mine = [i for i in seg.ContributingEquipmentSequence if i.Manufacturer == model_creator]
        mine[0].DeviceUID = device_uid
    return seg


def labels_from_seg(seg, source_datasets: Sequence[Dataset], catalogue=None) -> nib.Nifti1Image:
    """A SEG read back as a catalogue label map on the source series' grid (per source instance).

    Segments are mapped back to catalogue ids by their Tracking ID (the catalogue name), checked
    against their SNOMED type code. Used by tests and by anyone round-tripping our SEGs.
    """
    import highdicom as hd

    from .catalogue import load_catalogue

    catalogue = catalogue or load_catalogue()
    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.Segmentation.from_dataset(seg)
    ordered, affine = sort_datasets(source_datasets)
    numbers = list(seg.get_segment_numbers())
    lut = np.zeros(max(numbers) + 1, np.uint8)
    for n in numbers:
        desc = seg.get_segment_description(n)
        s = catalogue.get(desc.tracking_id)
        if desc.segmented_property_type.value != s.type.code:
            raise ValueError(f"segment {n} ({desc.segment_label}) has a code that does not match {s.name}")
        lut[n] = s.id
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in ordered], combine_segments=True, skip_overlap_checks=False, dtype=np.uint16,
    )
    data = lut[pixels].transpose(2, 1, 0)
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    return out
