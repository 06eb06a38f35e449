#!/usr/bin/env python3
"""Generate realistic synthetic CT (or MR) studies as DICOM Part-10 files.

The studies are meant for demonstrations, tests and benchmarks of the workload manager: they look like
real single-frame CT acquisitions to any strict DICOM reader (complete patient, study, series, frame of
reference, equipment, image plane, image pixel and CT image modules) and contain a simple but plausible
body phantom in Hounsfield units, so that image processing applications produce meaningful results.

Everything is deterministic: the same ``seed`` produces byte-identical files (UIDs, dates, noise), a
different seed produces different UIDs and noise.

Usage as a module::

    import synthetic
    study = synthetic.generate_study(Path("/tmp/study"), series_count=2, instances_per_series=30)
    print(study.study_uid, len(study.paths))

Usage as a command::

    python samples/synthetic.py OUT_DIR --studies 2 --series 2 --instances 30 --rows 512 --cols 512

The phantom (see :class:`Phantom`) is an elliptical body of soft tissue (40 HU) wrapped in a layer of
subcutaneous fat (-100 HU), with two lungs (-800 HU) when the body part is the chest, a vertebra made of a
cortical bone ring (700 HU) around cancellous bone (250 HU), and the patient table (150 HU) under the
patient, separated from the body by air (-1000 HU). Body and lung sizes vary smoothly along z so that
neighbouring slices differ, as they would in a real acquisition.
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    RE_VALID_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = [
    "BODY_TISSUES",
    "CT_IMAGE_STORAGE",
    "DEFAULT_FIELD_OF_VIEW_MM",
    "DEFAULT_SERIES",
    "HOUNSFIELD_UNITS",
    "MR_IMAGE_STORAGE",
    "MR_SIGNAL",
    "NOISE_SIGMA",
    "RESCALE_INTERCEPT",
    "SOP_CLASS_BY_MODALITY",
    "Phantom",
    "SeriesHeader",
    "SeriesInfo",
    "StudyHeader",
    "StudyInfo",
    "Tissue",
    "generate_study",
    "main",
    "make_instance",
    "series_uid_for",
    "sop_instance_uid_for",
    "study_uid_for",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
"""SOP Class UID of CT Image Storage."""

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
"""SOP Class UID of MR Image Storage."""

SOP_CLASS_BY_MODALITY: dict[str, str] = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}
_MODALITIES = ", ".join(sorted(SOP_CLASS_BY_MODALITY))

RESCALE_INTERCEPT = -1024
"""CT stored values are ``HU - RESCALE_INTERCEPT`` (rescale slope 1)."""

DEFAULT_FIELD_OF_VIEW_MM = 460.0
"""Reconstruction diameter: a 512 matrix gives a pixel spacing of about 0.9 mm."""

DEFAULT_SERIES: tuple[tuple[str, float], ...] = (
    ("AXIAL 5mm", 5.0),
    ("AXIAL 1.25mm", 1.25),
    ("AXIAL 2.5mm", 2.5),
    ("AXIAL 3mm", 3.0),
    ("AXIAL 0.625mm", 0.625),
)
"""Default (SeriesDescription, SliceThickness) of successive series; cycled when more are requested."""

NOISE_SIGMA = 10.0
"""Standard deviation of the additive image noise (HU for CT, signal units for MR)."""

_UID_NAMESPACE = "mwm-synthetic"
_TABLE_CENTER_Z_MM = -150.0
_NOISE_PAD = 64
_MM_RE = re.compile(r"(\d+(?:\.\d+)?)\s*mm", re.IGNORECASE)


class Tissue(enum.IntEnum):
    """Labels of the phantom's tissue classes, as stored in :meth:`Phantom.labels`."""

    AIR = 0
    SOFT_TISSUE = 1
    FAT = 2
    LUNG = 3
    BONE = 4
    MARROW = 5
    TABLE = 6


HOUNSFIELD_UNITS: dict[Tissue, int] = {
    Tissue.AIR: -1000,
    Tissue.SOFT_TISSUE: 40,
    Tissue.FAT: -100,
    Tissue.LUNG: -800,
    Tissue.BONE: 700,
    Tissue.MARROW: 250,
    Tissue.TABLE: 150,
}
"""Nominal CT number of each tissue class (before noise)."""

MR_SIGNAL: dict[Tissue, int] = {
    Tissue.AIR: 0,
    Tissue.SOFT_TISSUE: 600,
    Tissue.FAT: 1200,
    Tissue.LUNG: 40,
    Tissue.BONE: 30,
    Tissue.MARROW: 1000,
    Tissue.TABLE: 0,
}
"""Nominal T1-weighted-like MR signal of each tissue class (before noise)."""

BODY_TISSUES: frozenset[Tissue] = frozenset(
    {Tissue.SOFT_TISSUE, Tissue.FAT, Tissue.LUNG, Tissue.BONE, Tissue.MARROW},
)
"""Tissue classes that belong to the patient's body (everything except air and the table)."""


# --------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------


class Phantom:
    """An analytic axial body phantom sampled on a fixed pixel grid.

    Coordinates are millimetres in the patient coordinate system (x to the patient's left, y posterior),
    with the origin at the centre of the image. The pixel grids are computed once; :meth:`labels` only
    evaluates the shapes inside their bounding boxes, so a 512x512 slice takes well under a millisecond.

    Args:
        rows: Number of image rows.
        cols: Number of image columns.
        field_of_view_mm: Reconstruction diameter covered by ``max(rows, cols)`` pixels.
        body_part: ``"CHEST"`` draws the lungs; any other body part omits them.
    """

    # Shape parameters, in millimetres.
    BODY_SEMI_AXES = (180.0, 120.0)
    FAT_THICKNESS = 12.0
    LUNG_CENTERS_X = (-80.0, 80.0)
    LUNG_CENTER_Y = -5.0
    LUNG_SEMI_AXES = (60.0, 85.0)
    SPINE_CENTER = (0.0, 75.0)
    SPINE_RADII = (20.0, 13.0)  # outer (cortical bone), inner (marrow)
    TABLE_Y_RANGE = (152.0, 166.0)
    TABLE_HALF_WIDTH = 200.0

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        field_of_view_mm: float = DEFAULT_FIELD_OF_VIEW_MM,
        body_part: str = "CHEST",
    ) -> None:
        if rows < 1 or cols < 1:
            raise ValueError(f"image size must be positive, got {rows}x{cols}")
        if field_of_view_mm <= 0:
            raise ValueError(f"field of view must be positive, got {field_of_view_mm}")
        self.rows = rows
        self.cols = cols
        self.body_part = body_part.upper()
        self.pixel_spacing = field_of_view_mm / max(rows, cols)
        # Pixel centres, ascending (required by the bounding-box search).
        self._x = ((np.arange(cols) - (cols - 1) / 2.0) * self.pixel_spacing).astype(np.float32)
        self._y = ((np.arange(rows) - (rows - 1) / 2.0) * self.pixel_spacing).astype(np.float32)
        self._table = self._box_mask(
            -self.TABLE_HALF_WIDTH, self.TABLE_HALF_WIDTH, self.TABLE_Y_RANGE[0], self.TABLE_Y_RANGE[1]
        )

    @property
    def origin(self) -> tuple[float, float]:
        """Patient x and y of the centre of the first (top left) pixel."""
        return float(self._x[0]), float(self._y[0])

    @staticmethod
    def body_scale(z_mm: float) -> float:
        """Relative size of the body outline at ``z_mm`` (between 0.94 and 1.02)."""
        return 0.98 + 0.04 * math.sin(2.0 * math.pi * z_mm / 400.0 + 0.5)

    @staticmethod
    def lung_scale(z_mm: float) -> float:
        """Relative size of the lungs at ``z_mm`` (between 0.70 and 1.00)."""
        return 0.85 + 0.15 * math.sin(2.0 * math.pi * z_mm / 240.0)

    def labels(self, z_mm: float) -> npt.NDArray[np.uint8]:
        """Return the :class:`Tissue` label of every pixel of the axial slice at ``z_mm``."""
        out = np.zeros((self.rows, self.cols), dtype=np.uint8)
        out[self._table] = Tissue.TABLE
        sb = self.body_scale(z_mm)
        ax, ay = self.BODY_SEMI_AXES[0] * sb, self.BODY_SEMI_AXES[1] * sb
        self._paint_ellipse(out, Tissue.FAT, 0.0, 0.0, ax, ay)
        fat = self.FAT_THICKNESS
        self._paint_ellipse(out, Tissue.SOFT_TISSUE, 0.0, 0.0, ax - fat, ay - fat)
        if self.body_part == "CHEST":
            sl = self.lung_scale(z_mm)
            lx, ly = self.LUNG_SEMI_AXES[0] * sl, self.LUNG_SEMI_AXES[1] * sl
            for cx in self.LUNG_CENTERS_X:
                self._paint_ellipse(out, Tissue.LUNG, cx, self.LUNG_CENTER_Y, lx, ly)
        sx, sy = self.SPINE_CENTER
        self._paint_ellipse(out, Tissue.BONE, sx, sy, self.SPINE_RADII[0], self.SPINE_RADII[0])
        self._paint_ellipse(out, Tissue.MARROW, sx, sy, self.SPINE_RADII[1], self.SPINE_RADII[1])
        return out

    def body_mask(self, z_mm: float) -> npt.NDArray[np.bool_]:
        """Return the ground-truth body mask (every :data:`BODY_TISSUES` pixel) of the slice at ``z_mm``."""
        labels = self.labels(z_mm)
        mask: npt.NDArray[np.bool_] = (labels != Tissue.AIR) & (labels != Tissue.TABLE)
        return mask

    def _index_range(self, coords: npt.NDArray[np.float32], low: float, high: float) -> slice:
        first = int(np.searchsorted(coords, low, side="left"))
        return slice(first, int(np.searchsorted(coords, high, side="right")))

    def _box_mask(self, x0: float, x1: float, y0: float, y1: float) -> npt.NDArray[np.bool_]:
        mask = np.zeros((self.rows, self.cols), dtype=bool)
        mask[self._index_range(self._y, y0, y1), self._index_range(self._x, x0, x1)] = True
        return mask

    def _paint_ellipse(
        self, out: npt.NDArray[np.uint8], value: int, cx: float, cy: float, ax: float, ay: float
    ) -> None:
        if ax <= 0 or ay <= 0:
            return
        rs = self._index_range(self._y, cy - ay, cy + ay)
        cs = self._index_range(self._x, cx - ax, cx + ax)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        dx = (self._x[cs] - cx) / ax
        dy = (self._y[rs] - cy) / ay
        inside = (dy * dy)[:, None] + (dx * dx)[None, :] <= 1.0
        out[rs, cs][inside] = value


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesInfo:
    """One generated series."""

    series_uid: str
    description: str
    paths: list[Path]
    series_number: int = 0
    slice_thickness: float = 0.0
    z_positions: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class StudyInfo:
    """One generated study; ``series`` share patient, study and frame of reference."""

    study_uid: str
    patient_id: str
    series: list[SeriesInfo]
    frame_of_reference_uid: str = ""
    pixel_spacing: float = 0.0

    @property
    def paths(self) -> list[Path]:
        """All files of the study, series by series, in instance order."""
        return [path for series in self.series for path in series.paths]


# --------------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyHeader:
    """Patient, study and frame-of-reference attributes shared by all instances of a study."""

    study_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str = "Referring^Doctor"
    institution_name: str = "Synthetic Imaging Centre"


@dataclass(frozen=True)
class SeriesHeader:
    """Series, equipment and geometry attributes shared by all instances of a series."""

    series_uid: str
    series_number: int
    description: str
    modality: str
    body_part: str
    slice_thickness: float
    rows: int
    cols: int
    pixel_spacing: float
    origin_xy: tuple[float, float]
    series_time: str
    manufacturer: str = "MWM Synthetic"
    model_name: str = "Phantom Scanner"
    software_version: str = "1.0"
    station_name: str = "SYNTH01"
    device_serial_number: str = "0001"


def study_uid_for(seed: int) -> str:
    """Deterministic StudyInstanceUID of the study generated with ``seed``."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, "study", str(seed)])


def series_uid_for(study_uid: str, seed: int, series_number: int) -> str:
    """Deterministic SeriesInstanceUID of series ``series_number`` of a study."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, "series", study_uid, str(seed), str(series_number)])


def sop_instance_uid_for(series_uid: str, instance_number: int) -> str:
    """Deterministic SOPInstanceUID of instance ``instance_number`` of a series."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, "instance", series_uid, str(instance_number)])


def _ds(value: float) -> DSfloat:
    """A decimal string that always fits the 16 characters allowed by the DS VR ("5", not "5.0")."""
    if float(value).is_integer() and abs(value) < 1e15:
        return DSfloat(str(int(value)))
    return DSfloat(value, auto_format=True)


def _study_header(seed: int, *, patient_id: str | None, study_uid: str | None, body_part: str) -> StudyHeader:
    rng = np.random.default_rng([abs(seed), 0 if seed >= 0 else 1, 1])
    study_uid = study_uid or study_uid_for(seed)
    study_date = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 366)))
    birth_date = dt.date(int(rng.integers(1935, 2000)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    hour, minute = int(rng.integers(7, 19)), int(rng.integers(0, 60))
    number = abs(seed) % 10**8
    return StudyHeader(
        study_uid=study_uid,
        frame_of_reference_uid=generate_uid(entropy_srcs=[_UID_NAMESPACE, "for", study_uid, str(seed)]),
        patient_id=patient_id or f"SYN{number:08d}",
        patient_name=f"Synthetic^Patient{number}",
        patient_birth_date=birth_date.strftime("%Y%m%d"),
        patient_sex="M" if rng.integers(0, 2) else "F",
        study_date=study_date.strftime("%Y%m%d"),
        study_time=f"{hour:02d}{minute:02d}00",
        accession_number=f"ACC{number:08d}",
        study_id=str(number % 10**6),
        study_description=f"CT {body_part.upper()} SYNTHETIC",
    )


def make_instance(
    study: StudyHeader,
    series: SeriesHeader,
    *,
    instance_number: int,
    z_mm: float,
    pixels: npt.NDArray[np.integer],
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build one single-frame CT (or MR) image dataset, with file meta, ready for ``dcmwrite``.

    Args:
        study: Patient, study and frame-of-reference attributes.
        series: Series, equipment and geometry attributes.
        instance_number: InstanceNumber (1-based).
        z_mm: Patient z of the slice (ImagePositionPatient[2] and SliceLocation).
        pixels: Stored pixel values, shape ``(rows, cols)``: ``HU - RESCALE_INTERCEPT`` as signed 16-bit
            integers for CT, unsigned 16-bit signal for MR.
        sop_instance_uid: SOPInstanceUID; derived from the series UID and instance number by default.

    Returns:
        The dataset, with ``file_meta`` set for Explicit VR Little Endian.
    """
    modality = series.modality.upper()
    if modality not in SOP_CLASS_BY_MODALITY:
        raise ValueError(f"unsupported modality {series.modality!r} (expected one of {_MODALITIES})")
    if pixels.shape != (series.rows, series.cols):
        raise ValueError(f"pixel array shape {pixels.shape} does not match {series.rows}x{series.cols}")
    sop_class_uid = SOP_CLASS_BY_MODALITY[modality]
    sop_instance_uid = sop_instance_uid or sop_instance_uid_for(series.series_uid, instance_number)
    is_ct = modality == "CT"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if is_ct else ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = series.series_time
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    # General Study
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = series.series_time
    ds.AcquisitionTime = series.series_time
    ds.ContentTime = series.series_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = modality
    # General Equipment
    ds.Manufacturer = series.manufacturer
    ds.InstitutionName = study.institution_name
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StationName = series.station_name
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = series.model_name
    # Patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    # Series / acquisition
    ds.BodyPartExamined = series.body_part.upper()
    if is_ct:
        ds.SliceThickness = _ds(series.slice_thickness)
        ds.KVP = _ds(120)
        ds.DataCollectionDiameter = _ds(500)
        ds.DeviceSerialNumber = series.device_serial_number
        ds.SoftwareVersions = series.software_version
        ds.ReconstructionDiameter = _ds(series.pixel_spacing * max(series.rows, series.cols))
        ds.GantryDetectorTilt = _ds(0)
        ds.TableHeight = _ds(150)
        ds.RotationDirection = "CW"
        ds.ExposureTime = 500
        ds.XRayTubeCurrent = 200
        ds.Exposure = 100
        ds.FilterType = "BODY FILTER"
        ds.GeneratorPower = 24
        ds.FocalSpots = _ds(1.2)
        ds.ConvolutionKernel = "STANDARD"
        ds.RevolutionTime = 0.5
        ds.SingleCollimationWidth = 0.625
        ds.TotalCollimationWidth = 40.0
        ds.SpiralPitchFactor = 0.984
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = _ds(series.slice_thickness)
        ds.RepetitionTime = _ds(500)
        ds.EchoTime = _ds(15)
        ds.ImagingFrequency = _ds(63.87)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = _ds(1.5)
        ds.SpacingBetweenSlices = _ds(series.slice_thickness)
        ds.EchoTrainLength = 1
        ds.DeviceSerialNumber = series.device_serial_number
        ds.SoftwareVersions = series.software_version
        ds.FlipAngle = _ds(90)
    ds.PatientPosition = "HFS"
    # Relationship
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    # Image plane
    ds.ImagePositionPatient = [_ds(series.origin_xy[0]), _ds(series.origin_xy[1]), _ds(z_mm)]
    ds.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, 1, 0)]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z_mm)
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = series.cols
    ds.PixelSpacing = [_ds(series.pixel_spacing), _ds(series.pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if is_ct else 0
    if is_ct:
        ds.WindowCenter = _ds(40)
        ds.WindowWidth = _ds(400)
        ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
        ds.RescaleSlope = _ds(1)
        ds.RescaleType = "HU"
        ds.WindowCenterWidthExplanation = "SOFT TISSUE"
    else:
        ds.WindowCenter = _ds(600)
        ds.WindowWidth = _ds(1200)
    ds.PixelData = pixels.astype("<i2" if is_ct else "<u2", copy=False).tobytes()
    return ds


# --------------------------------------------------------------------------------------------------
# Study generation
# --------------------------------------------------------------------------------------------------


def _series_layout(series_count: int, series_descriptions: Sequence[str] | None) -> list[tuple[str, float]]:
    """Return the (description, slice thickness) of each series."""
    if series_descriptions is not None and len(series_descriptions) != series_count:
        raise ValueError(
            f"series_descriptions has {len(series_descriptions)} entries, expected {series_count}",
        )
    layout: list[tuple[str, float]] = []
    for index in range(series_count):
        default_description, thickness = DEFAULT_SERIES[index % len(DEFAULT_SERIES)]
        description = default_description
        if series_descriptions is not None:
            description = series_descriptions[index]
            match = _MM_RE.search(description)
            if match and float(match.group(1)) > 0:
                thickness = float(match.group(1))
        layout.append((description, thickness))
    return layout


def generate_study(
    out_dir: Path,
    *,
    series_count: int = 2,
    instances_per_series: int = 30,
    rows: int = 512,
    cols: int = 512,
    modality: str = "CT",
    seed: int = 0,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_descriptions: Sequence[str] | None = None,
    body_part: str = "CHEST",
) -> StudyInfo:
    """Write one synthetic study as ``out_dir/<series_number>/<instance_number:04d>.dcm``.

    All series share the patient, the study and the frame of reference and image the same phantom around
    the same table position; they differ by slice thickness (taken from a ``"<n>mm"`` suffix of the
    description when present, else 5, 1.25, 2.5, ... mm). Slices are contiguous:
    ImagePositionPatient z increases by SliceThickness with the instance number.

    Args:
        out_dir: Destination folder, created if missing. Existing files with the same names are replaced.
        series_count: Number of series.
        instances_per_series: Number of slices (files) in each series.
        rows: Image rows.
        cols: Image columns.
        modality: ``"CT"`` (CT Image Storage, HU via rescale) or ``"MR"`` (MR Image Storage).
        seed: Seed of every random or derived value (UIDs, dates, patient, noise).
        patient_id: PatientID; derived from the seed by default.
        study_uid: StudyInstanceUID; derived from the seed by default.
        series_descriptions: SeriesDescription of each series (``series_count`` entries).
        body_part: BodyPartExamined; ``"CHEST"`` also draws lungs in the phantom.

    Returns:
        The UIDs and file paths of what was written.
    """
    if series_count < 1:
        raise ValueError(f"series_count must be at least 1, got {series_count}")
    if instances_per_series < 1:
        raise ValueError(f"instances_per_series must be at least 1, got {instances_per_series}")
    modality = modality.upper()
    if modality not in SOP_CLASS_BY_MODALITY:
        raise ValueError(f"unsupported modality {modality!r} (expected one of {_MODALITIES})")
    if study_uid is not None and not (len(study_uid) <= 64 and RE_VALID_UID.match(study_uid)):
        raise ValueError(f"invalid study UID {study_uid!r}")

    out_dir = Path(out_dir)
    layout = _series_layout(series_count, series_descriptions)
    study = _study_header(seed, patient_id=patient_id, study_uid=study_uid, body_part=body_part)
    phantom = Phantom(rows, cols, body_part=body_part)
    if modality == "CT":
        lut = np.array([HOUNSFIELD_UNITS[t] - RESCALE_INTERCEPT for t in Tissue], dtype=np.int32)
    else:
        lut = np.array([MR_SIGNAL[t] for t in Tissue], dtype=np.int32)

    # One noise field slightly larger than the image; every slice uses a different window into it.
    rng = np.random.default_rng([abs(seed), 0 if seed >= 0 else 1, 2])
    gaussian = rng.normal(0.0, NOISE_SIGMA, size=(rows + _NOISE_PAD, cols + _NOISE_PAD))
    noise = np.clip(np.rint(gaussian), -4 * NOISE_SIGMA, 4 * NOISE_SIGMA).astype(np.int32)
    low, high = (-32768, 32767) if modality == "CT" else (0, 65535)

    hour, minute = int(study.study_time[:2]), int(study.study_time[2:4])
    series_infos: list[SeriesInfo] = []
    for index, (description, thickness) in enumerate(layout):
        series_number = index + 1
        start_minute = hour * 60 + minute + 2 * (index + 1)
        series = SeriesHeader(
            series_uid=series_uid_for(study.study_uid, seed, series_number),
            series_number=series_number,
            description=description,
            modality=modality,
            body_part=body_part,
            slice_thickness=thickness,
            rows=rows,
            cols=cols,
            pixel_spacing=phantom.pixel_spacing,
            origin_xy=phantom.origin,
            series_time=f"{(start_minute // 60) % 24:02d}{start_minute % 60:02d}00",
        )
        series_dir = out_dir / str(series_number)
        series_dir.mkdir(parents=True, exist_ok=True)
        offsets = rng.integers(0, _NOISE_PAD + 1, size=(instances_per_series, 2))
        paths: list[Path] = []
        positions: list[float] = []
        first_z = _TABLE_CENTER_Z_MM - (instances_per_series - 1) * thickness / 2.0
        for i in range(instances_per_series):
            z_mm = round(first_z + i * thickness, 4)
            oy, ox = int(offsets[i, 0]), int(offsets[i, 1])
            values = lut[phantom.labels(z_mm)]
            values += noise[oy : oy + rows, ox : ox + cols]
            np.clip(values, low, high, out=values)
            ds = make_instance(study, series, instance_number=i + 1, z_mm=z_mm, pixels=values)
            path = series_dir / f"{i + 1:04d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
            positions.append(z_mm)
        series_infos.append(
            SeriesInfo(
                series_uid=series.series_uid,
                description=description,
                paths=paths,
                series_number=series_number,
                slice_thickness=thickness,
                z_positions=positions,
            )
        )
    return StudyInfo(
        study_uid=study.study_uid,
        patient_id=study.patient_id,
        series=series_infos,
        frame_of_reference_uid=study.frame_of_reference_uid,
        pixel_spacing=phantom.pixel_spacing,
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthetic.py",
        description=(
            "Write synthetic CT/MR studies as DICOM Part-10 files. With one study the files go to "
            "OUT_DIR/<series>/<instance>.dcm; with several, study k (1-based) goes to OUT_DIR/study_<k> "
            "and uses seed SEED+k-1."
        ),
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="destination folder")
    parser.add_argument("--studies", type=_positive_int, default=1, help="number of studies (default 1)")
    parser.add_argument("--series", type=_positive_int, default=2, help="series per study (default 2)")
    parser.add_argument("--instances", type=_positive_int, default=30, help="slices per series (default 30)")
    parser.add_argument("--rows", type=_positive_int, default=512, help="image rows (default 512)")
    parser.add_argument("--cols", type=_positive_int, default=512, help="image columns (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first study (default 0)")
    parser.add_argument(
        "--modality", type=str.upper, choices=sorted(SOP_CLASS_BY_MODALITY), default="CT", help="default CT"
    )
    parser.add_argument("--body-part", default="CHEST", help="BodyPartExamined (default CHEST)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    total_files = 0
    total_bytes = 0
    started = time.perf_counter()
    for k in range(args.studies):
        study_dir = args.out_dir if args.studies == 1 else args.out_dir / f"study_{k + 1:03d}"
        info = generate_study(
            study_dir,
            series_count=args.series,
            instances_per_series=args.instances,
            rows=args.rows,
            cols=args.cols,
            modality=args.modality,
            seed=args.seed + k,
            body_part=args.body_part,
        )
        size = sum(path.stat().st_size for path in info.paths)
        total_files += len(info.paths)
        total_bytes += size
        print(f"study {info.study_uid} patient {info.patient_id} -> {study_dir} ({len(info.paths)} files)")
        for series in info.series:
            print(
                f"  series {series.series_number} {series.series_uid} '{series.description}': "
                f"{len(series.paths)} x {args.rows}x{args.cols} -> {series.paths[0].parent}"
            )
    elapsed = time.perf_counter() - started
    print(f"wrote {total_files} files, {total_bytes / 1e6:.1f} MB in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
