#!/usr/bin/env python3
"""ct_sample: segment the patient's body on a CT series and report its volume.

A small but complete imaging application that follows the run contract of the MONAI Deploy App SDK, so
that it can be packaged as a MONAI Application Package (MAP) and run by the workload manager:

* input, output and model locations come from ``-i/--input``, ``-o/--output`` and ``-m/--model``, else
  from ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH``, else from the older
  ``MONAI_INPUTPATH``, ``MONAI_OUTPUTPATH`` and ``MONAI_MODELPATH``, else ``/var/holoscan/input`` and
  ``/var/holoscan/output``;
* every DICOM file below the input folder is read; the CT series with the most slices is chosen;
* the body is segmented (HU above -500, largest connected region of each slice, holes filled);
* a DICOM Segmentation (one BINARY segment "Body") and ``metadata.json`` are written to the output;
* exit status 0 on success, 2 when the input folder is missing or holds no CT series, 1 otherwise.

Only pydicom, numpy and highdicom are needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

APP_NAME = "mwm ct_sample"
APP_VERSION = "1.0.0"

HU_THRESHOLD = -500.0
"""Voxels above this CT number are candidate body voxels."""

SEGMENTATION_CHUNK = 64
"""Slices segmented together (bounds the memory of the run-length encoding on long series)."""

SEGMENTATION_FILE_NAME = "body_seg.dcm"
METADATA_FILE_NAME = "metadata.json"

DEFAULT_INPUT_PATH = "/var/holoscan/input"
DEFAULT_OUTPUT_PATH = "/var/holoscan/output"

INPUT_ENV_VARS = ("HOLOSCAN_INPUT_PATH", "MONAI_INPUTPATH")
OUTPUT_ENV_VARS = ("HOLOSCAN_OUTPUT_PATH", "MONAI_OUTPUTPATH")
MODEL_ENV_VARS = ("HOLOSCAN_MODEL_PATH", "MONAI_MODELPATH")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
"""Segmented property category (CID 7150)."""

ENTIRE_BODY = Code("38266002", "SCT", "Entire body")
"""Segmented property type."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

log = logging.getLogger("ct_sample")


class InputError(Exception):
    """The input cannot be processed (missing folder, no CT series): exit status 2."""


# --------------------------------------------------------------------------------------------------
# Run contract: paths
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where the application reads, writes and finds its models."""

    input: Path
    output: Path
    model: Path | None


def _first_env(environ: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def resolve_paths(
    input_arg: str | None, output_arg: str | None, model_arg: str | None, environ: Mapping[str, str]
) -> RunPaths:
    """Apply the precedence command line > HOLOSCAN_* > MONAI_* > defaults."""
    input_path = input_arg or _first_env(environ, INPUT_ENV_VARS) or DEFAULT_INPUT_PATH
    output_path = output_arg or _first_env(environ, OUTPUT_ENV_VARS) or DEFAULT_OUTPUT_PATH
    model_path = model_arg or _first_env(environ, MODEL_ENV_VARS)
    return RunPaths(Path(input_path), Path(output_path), Path(model_path) if model_path else None)


# --------------------------------------------------------------------------------------------------
# Reading and choosing the series
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """Header of one CT image file (pixel data not loaded)."""

    path: Path
    dataset: Dataset

    @property
    def geometry_key(self) -> tuple[Any, ...]:
        """Attributes that must be equal for slices to stack into one volume."""
        ds = self.dataset
        return (
            int(ds.Rows),
            int(ds.Columns),
            tuple(round(float(v), 4) for v in ds.ImageOrientationPatient),
            tuple(round(float(v), 4) for v in ds.PixelSpacing),
        )


@dataclass(frozen=True)
class ChosenSeries:
    """The series to process, with slices sorted along the slice normal."""

    series_uid: str
    study_uid: str
    description: str
    instances: list[Instance]
    positions: list[float]
    slice_spacing: float
    pixel_spacing: tuple[float, float]


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file below ``root`` (or ``root`` itself when it is a file), in sorted order."""
    if root.is_file():
        yield root
        return
    # Input folders may be assembled from symbolic links; follow them, but visit each folder once.
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            stat = Path(dirpath).stat()
        except OSError:
            dirnames.clear()
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def read_headers(root: Path) -> tuple[list[Instance], int, int]:
    """Read the header of every DICOM file below ``root``.

    Returns:
        The single-frame CT images found, the number of DICOM files read and the number of files skipped
        (not DICOM, unreadable).
    """
    images: list[Instance] = []
    ignored: Counter[str] = Counter()
    read = skipped = 0
    for path in iter_files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            log.info("skipping %s: not a DICOM file", path)
            skipped += 1
            continue
        except Exception as exc:  # noqa: BLE001 - a corrupt file must not stop the run
            log.warning("skipping %s: cannot be read (%s)", path, exc)
            skipped += 1
            continue
        read += 1
        reason = _not_a_ct_image(ds)
        if reason:
            log.debug("ignoring %s: %s", path, reason)
            ignored[reason] += 1
            continue
        images.append(Instance(path, ds))
    for reason, count in sorted(ignored.items()):
        log.info("ignored %d DICOM file(s): %s", count, reason)
    return images, read, skipped


def _not_a_ct_image(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be used as a CT slice, or None when it can."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class != CT_IMAGE_STORAGE:
        return f"SOP class {sop_class or 'missing'} ({modality or 'no modality'}) is not CT Image Storage"
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return "multi-frame image"
    missing = [
        keyword
        for keyword in (
            "SeriesInstanceUID",
            "StudyInstanceUID",
            "Rows",
            "Columns",
            "PixelSpacing",
            "ImagePositionPatient",
            "ImageOrientationPatient",
        )
        if ds.get(keyword) in (None, "")
    ]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def _slice_normal(ds: Dataset) -> npt.NDArray[np.float64]:
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise InputError(f"degenerate ImageOrientationPatient {list(orientation)}")
    return normal / norm


def _position_along(normal: npt.NDArray[np.float64], ds: Dataset) -> float:
    """ImagePositionPatient projected on the slice normal, in mm."""
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64)))


def choose_series(images: Sequence[Instance]) -> ChosenSeries:
    """Pick the CT series with the most geometrically consistent slices and sort it.

    Slices of a series are grouped by (Rows, Columns, ImageOrientationPatient, PixelSpacing) and the
    largest group is kept. Ties between series are broken by the lower SeriesNumber, then the UID.
    Duplicate SOP instances and slices at an already used position are dropped.
    """
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for image in images:
        by_series[str(image.dataset.SeriesInstanceUID)].append(image)
    if not by_series:
        raise InputError("no CT image series found")

    candidates: list[tuple[int, int, str, list[Instance]]] = []
    for series_uid, members in by_series.items():
        groups: dict[tuple[Any, ...], list[Instance]] = defaultdict(list)
        for image in members:
            groups[image.geometry_key].append(image)
        best = max(groups.values(), key=len)
        if len(groups) > 1:
            log.warning(
                "series %s mixes %d geometries; keeping the %d slices of the largest",
                series_uid,
                len(groups),
                len(best),
            )
        unique: dict[str, Instance] = {}
        for image in best:
            unique.setdefault(str(image.dataset.SOPInstanceUID), image)
        number = image_series_number(best[0].dataset)
        candidates.append((len(unique), number, series_uid, list(unique.values())))
        log.info(
            "found CT series %s #%d '%s': %d slices",
            series_uid,
            number,
            best[0].dataset.get("SeriesDescription", ""),
            len(unique),
        )

    candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
    _, _, series_uid, members = candidates[0]

    normal = _slice_normal(members[0].dataset)
    projected = [(_position_along(normal, image.dataset), image) for image in members]
    projected.sort(key=lambda item: (item[0], int(item[1].dataset.get("InstanceNumber", 0) or 0)))
    instances: list[Instance] = []
    positions: list[float] = []
    for position, image in projected:
        if positions and abs(position - positions[-1]) < 1e-3:
            log.warning("dropping %s: same position (%.3f mm) as the previous slice", image.path, position)
            continue
        instances.append(image)
        positions.append(position)

    first = instances[0].dataset
    if len(positions) > 1:
        gaps = np.diff(np.asarray(positions))
        spacing = float(np.median(gaps))
        if float(np.max(np.abs(gaps - spacing))) > 0.01 * spacing + 1e-3:
            log.warning("slice spacing is irregular (%.3f to %.3f mm)", float(gaps.min()), float(gaps.max()))
    else:
        spacing = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 0.0)
        if spacing <= 0:
            spacing = 1.0
            log.warning("single slice without SliceThickness: assuming 1 mm")
    pixel_spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    return ChosenSeries(
        series_uid=series_uid,
        study_uid=str(first.StudyInstanceUID),
        description=str(first.get("SeriesDescription", "")),
        instances=instances,
        positions=positions,
        slice_spacing=spacing,
        pixel_spacing=pixel_spacing,
    )


def image_series_number(ds: Dataset) -> int:
    """SeriesNumber as an int (0 when absent or invalid)."""
    try:
        return int(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def load_volume(series: ChosenSeries) -> tuple[list[Dataset], npt.NDArray[np.float32]]:
    """Read the chosen slices with their pixel data.

    Returns:
        The datasets (same order as ``series.instances``, pixel data dropped once converted, to halve the
        memory held) and the volume in Hounsfield units, shape ``(slices, rows, columns)``.
    """
    datasets: list[Dataset] = []
    first = series.instances[0].dataset
    volume = np.empty((len(series.instances), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for index, instance in enumerate(series.instances):
        ds = pydicom.dcmread(instance.path, force=False)
        pixels = ds.pixel_array
        if pixels.shape != volume.shape[1:]:
            raise ValueError(f"{instance.path}: pixel data shape {pixels.shape}, expected {volume.shape[1:]}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(pixels, slope, out=volume[index], casting="unsafe")
        volume[index] += intercept
        del ds.PixelData
        datasets.append(ds)
    return datasets, volume


# --------------------------------------------------------------------------------------------------
# Segmentation (numpy only)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """Horizontal runs of a stack of 2-D masks, with the connected component of each run.

    ``rows`` are indices in the stack seen as ``(slices * height, width)``; ``ends`` are exclusive.
    ``roots`` gives, for every run, the index of the first run of its component (components never span
    two slices).
    """

    height: int
    width: int
    rows: npt.NDArray[np.intp]
    starts: npt.NDArray[np.intp]
    ends: npt.NDArray[np.intp]
    roots: npt.NDArray[np.intp]

    @property
    def slices(self) -> npt.NDArray[np.intp]:
        """Slice index of every run."""
        return self.rows // self.height

    @property
    def lengths(self) -> npt.NDArray[np.intp]:
        """Number of pixels of every run."""
        return self.ends - self.starts

    def paint(self, keep: npt.NDArray[np.bool_], depth: int) -> npt.NDArray[np.bool_]:
        """Rasterise the runs selected by ``keep`` into a ``(depth, height, width)`` mask."""
        edges = np.zeros((depth * self.height, self.width + 1), dtype=np.int8)
        edges[self.rows[keep], self.starts[keep]] = 1
        edges[self.rows[keep], self.ends[keep]] = -1
        filled = np.cumsum(edges, axis=1, dtype=np.int8)[:, : self.width] > 0
        return filled.reshape(depth, self.height, self.width)


def connected_runs(mask: npt.NDArray[np.bool_], connectivity: int = 4) -> Runs:
    """Label the 2-D connected components of every slice of ``mask`` (shape ``(slices, h, w)``).

    The mask is run-length encoded row by row; runs of consecutive rows of the same slice that touch are
    linked, and the links are resolved with a vectorised union-find (hooking on the smaller root, then
    pointer jumping). Cost is proportional to the number of runs, not of pixels.

    Args:
        mask: Boolean stack.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    depth, height, width = mask.shape
    flat = mask.reshape(depth * height, width)
    padded = np.zeros((depth * height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = flat
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    count = rows.size
    parent = np.arange(count, dtype=np.intp)
    if count == 0:
        return Runs(height, width, rows, starts, ends, parent)

    # Candidate neighbours of run b are the runs of the previous row whose [start, end) overlaps it.
    stride = width + 1
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    diagonal = 1 if connectivity == 8 else 0
    previous = (rows - 1) * stride
    low = np.searchsorted(end_keys, previous + starts - diagonal, side="right")
    high = np.searchsorted(start_keys, previous + ends + diagonal, side="left")
    counts = np.where(rows % height == 0, 0, np.maximum(high - low, 0))
    total = int(counts.sum())
    if total:
        b = np.repeat(np.arange(count, dtype=np.intp), counts)
        offsets = np.arange(total, dtype=np.intp) - np.repeat(np.cumsum(counts) - counts, counts)
        a = np.repeat(low, counts) + offsets
        while True:
            root_a, root_b = parent[a], parent[b]
            pending = root_a != root_b
            if not pending.any():
                break
            root_a, root_b = root_a[pending], root_b[pending]
            np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
            while True:
                jumped = parent[parent]
                if np.array_equal(jumped, parent):
                    break
                parent = jumped
    return Runs(height, width, rows, starts, ends, parent)


def largest_component(mask: npt.NDArray[np.bool_], connectivity: int = 4) -> npt.NDArray[np.bool_]:
    """Keep, in every slice of ``mask``, only its largest connected region."""
    runs = connected_runs(mask, connectivity)
    if runs.rows.size == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(runs.roots, weights=runs.lengths, minlength=runs.rows.size)
    roots = np.flatnonzero(runs.roots == np.arange(runs.rows.size))
    root_slices = runs.slices[roots]
    # Sort roots by slice, then by decreasing size: the first root of each slice is the largest.
    order = np.lexsort((-sizes[roots], root_slices))
    _, first = np.unique(root_slices[order], return_index=True)
    chosen = np.zeros(runs.rows.size, dtype=bool)
    chosen[roots[order][first]] = True
    return runs.paint(chosen[runs.roots], mask.shape[0])


def fill_holes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Fill, slice by slice, every background region that is not 4-connected to the slice border."""
    background = connected_runs(~mask, connectivity=4)
    if background.rows.size == 0:
        return mask.copy()
    row_in_slice = background.rows % background.height
    touches = (
        (background.starts == 0)
        | (background.ends == background.width)
        | (row_in_slice == 0)
        | (row_in_slice == background.height - 1)
    )
    outside = np.zeros(background.rows.size, dtype=bool)
    outside[background.roots[touches]] = True
    holes = background.paint(~outside[background.roots], mask.shape[0])
    return mask | holes


def segment_body(
    volume_hu: npt.NDArray[np.floating],
    threshold: float = HU_THRESHOLD,
) -> npt.NDArray[np.bool_]:
    """Body mask of a CT volume: threshold, largest region of each slice, holes (lungs, bowel gas) filled.

    The body is taken 8-connected and the background 4-connected, the pairing under which a closed
    outline is closed in both: a thin skin or fat layer that only touches diagonally (common on coarse
    matrices) still encloses the lungs.
    """
    mask = np.empty(volume_hu.shape, dtype=bool)
    # Slices are independent; working on chunks bounds the temporary arrays for long series.
    for start in range(0, volume_hu.shape[0], SEGMENTATION_CHUNK):
        chunk = slice(start, start + SEGMENTATION_CHUNK)
        mask[chunk] = fill_holes(largest_component(volume_hu[chunk] > threshold, connectivity=8))
    return mask


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def derived_uid(source_series_uid: str, role: str, source_instances: Sequence[str] = ()) -> str:
    """A UID determined by the source series, the exact source images (when given) and this
    app's version.

    Running the app again on the same images gives the same UIDs, so a receiver that keys on
    SOP Instance UID stores a re-run's result once instead of twice; a run on another set of the
    series' images (a part of it that arrived late, say) writes a different object, so it gets
    other UIDs and never replaces, or clashes with, the first result in an archive.
    """
    inputs = hashlib.sha256("\\".join(sorted(source_instances)).encode("ascii")).hexdigest()
    return str(pydicom.uid.generate_uid(entropy_srcs=[APP_NAME, APP_VERSION, source_series_uid, role, inputs]))


def build_segmentation(source_images: Sequence[Dataset], mask: npt.NDArray[np.bool_]) -> hd.seg.Segmentation:
    """A BINARY DICOM Segmentation with one "Body" segment referencing ``source_images``."""
    first = source_images[0]
    source_series = str(first.SeriesInstanceUID)
    used = [str(image.SOPInstanceUID) for image in source_images]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=APP_NAME,
        family=codes.cid7162.MorphologicalOperations,
        version=APP_VERSION,
        parameters={
            "hu_threshold": f"{HU_THRESHOLD:g}",
            "method": "largest 8-connected region per slice, 4-connected holes filled",
        },
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Body",
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=ENTIRE_BODY,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id="body",
        tracking_uid=derived_uid(source_series, "tracking"),
    )
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=derived_uid(source_series, "series", used),
        series_number=(1000 + image_series_number(first)) % 2**31,
        sop_instance_uid=derived_uid(source_series, "instance", used),
        instance_number=1,
        manufacturer="mwm",
        manufacturer_model_name="ct_sample",
        software_versions=APP_VERSION,
        device_serial_number="0",
        content_label="BODY",
        content_description="Body segmentation",
        series_description=f"Body segmentation ({APP_NAME})"[:64],
        omit_empty_frames=bool(mask.any()),
    )


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then move the result into place, so readers never see partial files."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run(paths: RunPaths) -> dict[str, Any]:
    """Process one input folder; returns the metadata written to ``metadata.json``."""
    started = time.perf_counter()
    if not paths.input.exists():
        raise InputError(f"input folder {paths.input} does not exist")
    paths.output.mkdir(parents=True, exist_ok=True)
    log.info("input %s, output %s", paths.input, paths.output)
    if paths.model is not None:
        log.info(
            "model path %s %s (not used: this application has no model)",
            paths.model,
            "exists" if paths.model.exists() else "does not exist",
        )

    images, read, skipped = read_headers(paths.input)
    log.info("read %d DICOM files (%d CT images), skipped %d other files", read, len(images), skipped)
    if not images:
        raise InputError(f"no CT image series found in {paths.input}")
    series = choose_series(images)
    log.info(
        "chose series %s '%s': %d slices, pixel spacing %.4g x %.4g mm, slice spacing %.4g mm",
        series.series_uid,
        series.description,
        len(series.instances),
        series.pixel_spacing[0],
        series.pixel_spacing[1],
        series.slice_spacing,
    )

    datasets, volume = load_volume(series)
    segment_started = time.perf_counter()
    mask = segment_body(volume)
    voxels = int(np.count_nonzero(mask))
    voxel_ml = series.pixel_spacing[0] * series.pixel_spacing[1] * series.slice_spacing / 1000.0
    mean_hu = float(volume[mask].mean(dtype=np.float64)) if voxels else None
    log.info(
        "segmented body in %.2f s: %d voxels, %.1f mL, mean %s HU",
        time.perf_counter() - segment_started,
        voxels,
        voxels * voxel_ml,
        f"{mean_hu:.1f}" if mean_hu is not None else "n/a",
    )
    if not voxels:
        log.warning("no body found (no voxel above %g HU)", HU_THRESHOLD)

    seg = build_segmentation(datasets, mask)
    seg_path = paths.output / SEGMENTATION_FILE_NAME
    _write_atomically(seg_path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
    log.info("wrote segmentation %s (series %s)", seg_path, seg.SeriesInstanceUID)

    metadata: dict[str, Any] = {
        "app_name": APP_NAME,
        "app_version": APP_VERSION,
        "study_instance_uid": series.study_uid,
        "series_instance_uid": series.series_uid,
        "series_description": series.description,
        "slice_count": len(series.instances),
        "rows": int(volume.shape[1]),
        "columns": int(volume.shape[2]),
        "pixel_spacing_mm": list(series.pixel_spacing),
        "slice_spacing_mm": series.slice_spacing,
        "hu_threshold": HU_THRESHOLD,
        "body_voxel_count": voxels,
        "body_volume_ml": round(voxels * voxel_ml, 3),
        "mean_hu_body": round(mean_hu, 2) if mean_hu is not None else None,
        "segmentation_file": SEGMENTATION_FILE_NAME,
        "segmentation_series_instance_uid": str(seg.SeriesInstanceUID),
        "segmentation_sop_instance_uid": str(seg.SOPInstanceUID),
        "dicom_files_read": read,
        "files_skipped": skipped,
        "processing_seconds": round(time.perf_counter() - started, 3),
    }
    metadata_path = paths.output / METADATA_FILE_NAME
    text = json.dumps(metadata, indent=2) + "\n"
    _write_atomically(metadata_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("wrote %s in %.2f s total", metadata_path, metadata["processing_seconds"])
    return metadata


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


class _MaxLevelFilter(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure_logging(level: str) -> None:
    """Plain log lines: below WARNING to stdout, WARNING and above to stderr."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s ct_sample: %(message)s")
    stdout = logging.StreamHandler(sys.stdout)
    stdout.addFilter(_MaxLevelFilter(logging.WARNING))
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in (stdout, stderr):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    """Command line of the MONAI Deploy App SDK applications."""
    parser = argparse.ArgumentParser(
        prog="ct_sample",
        description="Segment the body on the largest CT series of the input and report its volume.",
    )
    parser.add_argument("-i", "--input", help=f"input folder (env {', '.join(INPUT_ENV_VARS)})")
    parser.add_argument("-o", "--output", help=f"output folder (env {', '.join(OUTPUT_ENV_VARS)})")
    parser.add_argument("-m", "--model", help=f"model folder, unused (env {', '.join(MODEL_ENV_VARS)})")
    parser.add_argument("-w", "--workdir", help="work folder (accepted for compatibility, unused)")
    parser.add_argument(
        "-l",
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"],
        default="INFO",
        help="logging level (default INFO)",
    )
    return parser


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    configure_logging("WARNING" if args.log_level == "WARN" else args.log_level)
    signal.signal(signal.SIGTERM, _terminate)
    paths = resolve_paths(args.input, args.output, args.model, os.environ if environ is None else environ)
    log.info(
        "%s %s starting (pydicom %s, highdicom %s)",
        APP_NAME,
        APP_VERSION,
        pydicom.__version__,
        hd.__version__,
    )
    try:
        run(paths)
    except InputError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except Exception:
        log.exception("processing failed")
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
