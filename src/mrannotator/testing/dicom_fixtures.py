"""Test fixtures: volumes written as real single-frame DICOM series, in any transfer syntax tested.

:func:`write_series` writes a volume (nibabel image, RAS affine) as one instance per slice along the
third voxel axis, in stored order, each with its own ImagePositionPatient and the shared
ImageOrientationPatient, so axial, sagittal, coronal, oblique and reversed-order acquisitions are all
written as acquired. The files pass ``dciodvfy`` (Debian dicom3tools) without errors. Pixel data is
encoded with pydicom's own encoders (RLE; JPEG-LS through pyjpegls; JPEG 2000 through
pylibjpeg-openjpeg) and with imagecodecs for JPEG Lossless SV1, which pydicom cannot encode.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from mrannotator.dicom import find_series, load_series
from mrannotator.dicom.geometry import decimal_string
from mrannotator.errors import InputError
from mrannotator.imageio import LPS_TO_RAS, load_image

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_COS_TOL = 1e-4
# every transfer syntax the tests write: uncompressed in each encoding, then the lossless codecs
TRANSFER_SYNTAXES = {
    "explicit_le": uids.ExplicitVRLittleEndian,
    "implicit_le": uids.ImplicitVRLittleEndian,
    "explicit_be": uids.ExplicitVRBigEndian,
    "deflated": uids.DeflatedExplicitVRLittleEndian,
    "rle": uids.RLELossless,
    "jpeg_lossless_sv1": uids.JPEGLosslessSV1,
    "jpeg_ls": uids.JPEGLSLossless,
    "jpeg2000": uids.JPEG2000Lossless,
}
_POST_ENCODED = {uids.RLELossless, uids.JPEGLSLossless, uids.JPEG2000Lossless}  # pydicom's Dataset.compress


def _round(v: float) -> float:
    """``v`` as written in a DS: 10 significant digits at most, as scanners write (the product's DS writer)."""
    return float(decimal_string(v, max_digits=10))


def _slice_geometry(affine_ras: np.ndarray):
    """(row cosine, column cosine, pixel spacing [row, col], slice step vector, origin), all LPS."""
    lps = LPS_TO_RAS @ np.asarray(affine_ras, float)
    m = lps[:3, :3]
    sp = np.sqrt((m**2).sum(axis=0))
    u = m / sp  # unit columns: i (along a row), j (down a column), k (slice step)
    if abs(float(u[:, 0] @ u[:, 1])) > _COS_TOL:
        raise InputError("the volume's in-plane axes are not perpendicular (sheared affine); DICOM cannot hold it")
    normal = np.cross(u[:, 0], u[:, 1])
    if abs(abs(float(normal @ u[:, 2])) - 1.0) > _COS_TOL:
        raise InputError("the volume's slice axis is not perpendicular to its slices (gantry tilt / shear)")
    return u[:, 0], u[:, 1], (float(sp[1]), float(sp[0])), m[:, 2], lps[:3, 3]


def _stored_pixels(data: np.ndarray) -> tuple[np.ndarray, int]:
    """(int16 or uint16 voxels, PixelRepresentation); non-integral intensities are refused, not rounded."""
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise InputError("write_series stores integer intensities; round or rescale the volume first")
        data = data.astype(np.int64)
    lo, hi = int(data.min()), int(data.max())
    if lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), 1
    if lo >= 0 and hi <= 65535:
        return data.astype(np.uint16), 0
    raise InputError(f"intensities {lo}..{hi} do not fit 16 bits")


def _set_pixels(ds: Dataset, frame: np.ndarray, syntax: str) -> None:
    """Pixel Data of one frame (rows, columns) in ``syntax``; the file meta says which."""
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == uids.JPEGLosslessSV1:
        import imagecodecs  # a dev dependency: imported where SV1 is written, so the package imports without it

        # imagecodecs' lossless JPEG is process 14, first-order prediction (SV1); same bits, unsigned view
        encoded = imagecodecs.ljpeg_encode(np.ascontiguousarray(frame).view(np.uint16), bitspersample=16)
        ds.PixelData = encapsulate([encoded])
        ds["PixelData"].VR = "OB"
    elif syntax == uids.ExplicitVRBigEndian:
        ds.PixelData = frame.astype(frame.dtype.newbyteorder(">")).tobytes()
        ds["PixelData"].VR = "OW"
    else:
        ds.PixelData = frame.tobytes()
        ds["PixelData"].VR = "OW"
        if syntax in _POST_ENCODED:
            ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
            ds.compress(syntax)


def _series_dataset(modality: str, uid: dict, series_number: int, texts: dict, image_type) -> Dataset:
    """The attributes every instance of the series shares (patient, study, series, equipment)."""
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MR_IMAGE_STORAGE if modality == "MR" else CT_IMAGE_STORAGE
    ds.ImageType = list(image_type)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.PatientName, ds.PatientID = texts["patient_name"], texts["patient_id"]
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.StudyID = uid["study"], "1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time, ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = texts["study_description"]
    ds.SeriesInstanceUID, ds.SeriesNumber = uid["series"], int(series_number)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = texts["series_description"]
    ds.Modality = modality
    ds.BodyPartExamined = texts["body_part"]
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uid["frame_of_reference"], ""
    ds.Manufacturer = "MRAnnotator test fixtures"
    ds.ManufacturerModelName = "tests/dicom_fixtures.write_series"
    ds.AcquisitionNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    if modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "1500", "100", "1"
        ds.MagneticFieldStrength = "1.5"
    else:
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.KVP = "120"
    return ds


def _geometry_attributes(ds: Dataset, geometry, k: int, iop_decimals: int | None, iop_jitter: float = 0.0) -> None:
    row_cos, col_cos, spacing, step, origin = geometry
    thickness = float(np.linalg.norm(step))
    position = origin + k * step
    ds.ImagePositionPatient = [_round(v) for v in position]
    if iop_jitter:  # as a real GE 3D T1 writes them: orientation strings that differ from slice to slice
        ds.ImageOrientationPatient = [_round(v + iop_jitter * ((k + n) % 3 - 1)) for n, v in
                                      enumerate((*row_cos, *col_cos))]
    elif iop_decimals is None:
        ds.ImageOrientationPatient = [_round(v) for v in (*row_cos, *col_cos)]
    else:  # as many scanners write it: rounded cosines that are no longer unit vectors
        ds.ImageOrientationPatient = [f"{v:.{iop_decimals}f}" for v in (*row_cos, *col_cos)]
    ds.SliceLocation = _round(float(position @ np.cross(row_cos, col_cos)))
    ds.SliceThickness = _round(thickness)
    ds.PixelSpacing = [_round(spacing[0]), _round(spacing[1])]
    if ds.Modality == "MR":
        ds.SpacingBetweenSlices = _round(thickness)


def _inverted(pixels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 storage: lo + hi - v in the stored type's range."""
    info = np.iinfo(pixels.dtype)
    return (int(info.min) + int(info.max) - pixels.astype(np.int64)).astype(pixels.dtype)


def _instance(shared: Dataset, instance_number: int) -> Dataset:
    """One instance of the series: the shared attributes, its own SOP Instance UID and file meta."""
    ds = copy.deepcopy(shared)
    ds.file_meta = FileMetaDataset()
    ds.SOPInstanceUID = uids.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = instance_number
    return ds


def write_series(
    image,
    folder: str | Path,
    *,
    modality: str = "MR",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "T2 3D",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "OTHER"),
    transfer_syntax: str = uids.ExplicitVRLittleEndian,
    iop_decimals: int | None = None,
    prefix: str | None = None,
    iop_jitter: float = 0.0,
    photometric: str = "MONOCHROME2",
    first_instance_number: int = 1,
    headers: dict | None = None,
    **texts: str,
) -> list[Path]:
    """Write ``image`` (a path, nibabel or SimpleITK image) as a DICOM series; returns the files.

    Slices follow the third voxel axis in stored order (instance number ``first_instance_number`` = first
    stored slice), so a volume stored head-to-feet is written as a reversed-order acquisition. ``texts`` may
    set patient_id, patient_name, study_description, body_part. Scanner quirks: ``iop_jitter`` (each slice's
    orientation strings off by up to that much), ``photometric="MONOCHROME1"`` (the values stored inverted,
    lo + hi - v in the stored range), ``headers`` (set on every instance: EchoTime, DiffusionBValue,
    TemporalPositionIdentifier, ImagesInAcquisition, ...).
    """
    img = load_image(image)
    modality = modality.upper()
    if modality not in ("MR", "CT"):
        raise ValueError("write_series writes MR or CT series")
    pixels, signed = _stored_pixels(np.asanyarray(img.dataobj))
    if photometric == "MONOCHROME1":
        pixels = _inverted(pixels)
    geometry = _slice_geometry(img.affine)
    texts = {"patient_id": "MRA0001", "patient_name": "Phantom^MRAnnotator", "body_part": "ABDOMEN",
             "study_description": "MRAnnotator test study", "series_description": series_description, **texts}
    uid = {"study": study_instance_uid or uids.generate_uid(), "series": series_instance_uid or uids.generate_uid(),
           "frame_of_reference": frame_of_reference_uid or uids.generate_uid()}
    shared = _series_dataset(modality, uid, series_number, texts, image_type)
    shared.PhotometricInterpretation = photometric
    for keyword, value in (headers or {}).items():
        setattr(shared, keyword, value)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f"{modality.lower()}{series_number:03d}"
    nx, ny, nz = pixels.shape
    files = []
    for k in range(nz):
        ds = _instance(shared, k + first_instance_number)
        _geometry_attributes(ds, geometry, k, iop_decimals, iop_jitter)
        ds.Rows, ds.Columns = ny, nx
        ds.PixelRepresentation = signed
        _set_pixels(ds, np.ascontiguousarray(pixels[:, :, k].T), transfer_syntax)  # rows = j, columns = i
        path = folder / f"{prefix}_{k + first_instance_number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def read_series(folder: str | Path) -> tuple[list[Dataset], nib.Nifti1Image]:
    """(headers in slice order, volume) of the one accepted series in ``folder``, through the product reader."""
    scan = find_series(folder)
    if len(scan.series) != 1:
        raise InputError(f"{folder} holds {len(scan.series)} accepted series; expected one ({scan.notes()})")
    return scan.series[0].datasets, load_series(scan.series[0])
