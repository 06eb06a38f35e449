"""Tests of ``samples/apps/ct_sample``: segmentation primitives, series selection and the run contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
import synthetic

CT_SAMPLE_DIR = Path(__file__).resolve().parents[2] / "samples" / "apps" / "ct_sample"
CT_SAMPLE_APP = CT_SAMPLE_DIR / "app.py"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
ROWS = COLS = 64
SLICES = 8


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> synthetic.StudyInfo:
    """2 series x 8 slices of 64x64, plus a file that is not DICOM."""
    root = tmp_path_factory.mktemp("ct-in")
    info = synthetic.generate_study(root, instances_per_series=SLICES, rows=ROWS, cols=COLS, seed=3)
    (root / "notes.txt").write_text("not a DICOM file\n")
    return info


def _run_app(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HOLOSCAN_", "MONAI_"))}
    return subprocess.run(
        [sys.executable, str(CT_SAMPLE_APP), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        check=False,
        timeout=120,
    )


def _expected_body_ml(study: synthetic.StudyInfo, series: synthetic.SeriesInfo) -> float:
    """Body volume of the phantom's ground truth, sampled like the series."""
    phantom = synthetic.Phantom(ROWS, COLS)
    voxels = sum(int(np.count_nonzero(phantom.body_mask(z))) for z in series.z_positions)
    return voxels * study.pixel_spacing**2 * series.slice_thickness / 1000.0


def _check_outputs(out: Path, study: synthetic.StudyInfo, series: synthetic.SeriesInfo) -> dict[str, Any]:
    """Validate metadata.json and the Segmentation against the series that should have been chosen."""
    metadata: dict[str, Any] = json.loads((out / "metadata.json").read_text())
    assert metadata["app_name"] == "mwm ct_sample"
    assert metadata["app_version"]
    assert metadata["study_instance_uid"] == study.study_uid
    assert metadata["series_instance_uid"] == series.series_uid
    assert metadata["slice_count"] == len(series.paths)
    assert metadata["processing_seconds"] > 0
    expected_ml = _expected_body_ml(study, series)
    assert metadata["body_volume_ml"] == pytest.approx(expected_ml, rel=0.10)
    assert -600 < metadata["mean_hu_body"] < 40

    seg_path = out / metadata["segmentation_file"]
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == seg.file_meta.MediaStorageSOPClassUID == SEG_SOP_CLASS
    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == study.study_uid
    assert seg.PatientID == study.patient_id
    assert seg.FrameOfReferenceUID == study.frame_of_reference_uid
    assert seg.SeriesInstanceUID not in {s.series_uid for s in study.series}
    assert seg.SeriesInstanceUID == metadata["segmentation_series_instance_uid"]
    assert seg.SOPInstanceUID == metadata["segmentation_sop_instance_uid"]
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Body"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("123037004", "SCT")
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
        "38266002",
        "SCT",
        "Entire body",
    )
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "mwm ct_sample"

    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.series_uid
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.paths}
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == source_uids
    frame_sources = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert frame_sources <= source_uids
    # The stored mask has exactly as many voxels as metadata.json reports.
    assert int(np.count_nonzero(seg.pixel_array)) == metadata["body_voxel_count"]
    return metadata


# --------------------------------------------------------------------------------------------------
# Segmentation primitives
# --------------------------------------------------------------------------------------------------


def _reference_sizes(mask: np.ndarray, connectivity: int) -> list[int]:
    """Component sizes of a 2-D mask by breadth-first search (slow but obviously right)."""
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    seen = np.zeros_like(mask, dtype=bool)
    sizes = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, size = deque([start]), 0
        while queue:
            r, c = queue.popleft()
            size += 1
            for dr, dc in steps:
                nr, nc = r + dr, c + dc
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        sizes.append(size)
    return sorted(sizes)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_runs_match_a_flood_fill(ct_app: ModuleType, connectivity: int) -> None:
    rng = np.random.default_rng(0)
    stack = rng.random((40, 13, 17)) < 0.55
    runs = ct_app.connected_runs(stack, connectivity)
    sizes = np.bincount(runs.roots, weights=runs.lengths, minlength=runs.rows.size)
    for index in range(stack.shape[0]):
        in_slice = (runs.slices == index) & (runs.roots == np.arange(runs.rows.size))
        assert sorted(int(s) for s in sizes[in_slice]) == _reference_sizes(stack[index], connectivity)
    # Painting every run gives the mask back.
    assert np.array_equal(runs.paint(np.ones(runs.rows.size, dtype=bool), stack.shape[0]), stack)


def test_largest_component_is_chosen_per_slice(ct_app: ModuleType) -> None:
    mask = np.zeros((3, 10, 12), dtype=bool)
    mask[0, 1:4, 1:4] = True  # 9 pixels
    mask[0, 5:9, 6:11] = True  # 20 pixels: kept
    mask[1, 0:8, 0:2] = True  # 16 pixels: kept (touches the border)
    mask[1, 4:6, 5:10] = True  # 10 pixels
    mask[1, 9, 11] = True
    # slice 2 stays empty
    kept = ct_app.largest_component(mask)
    expected = np.zeros_like(mask)
    expected[0, 5:9, 6:11] = True
    expected[1, 0:8, 0:2] = True
    assert np.array_equal(kept, expected)


def test_diagonal_contact_does_not_join_regions(ct_app: ModuleType) -> None:
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 0:3, 0:3] = True
    mask[0, 3:6, 3:6] = True
    mask[0, 3, 3] = True
    assert int(ct_app.largest_component(mask, connectivity=4).sum()) == 9
    assert int(ct_app.largest_component(mask, connectivity=8).sum()) == 18


def test_fill_holes_fills_enclosed_background_only(ct_app: ModuleType) -> None:
    ring = np.zeros((1, 9, 9), dtype=bool)
    ring[0, 1:8, 1:8] = True
    ring[0, 3:6, 3:6] = False  # enclosed hole: filled
    cup = np.zeros((1, 9, 9), dtype=bool)
    cup[0, 1:8, 1:8] = True
    cup[0, 0:6, 4] = False  # notch open to the border: stays open
    filled = ct_app.fill_holes(np.concatenate([ring, cup]))
    assert filled[0, 1:8, 1:8].all()
    assert not filled[1, 0:6, 4].any()
    assert np.array_equal(ct_app.fill_holes(np.zeros((2, 4, 4), dtype=bool)), np.zeros((2, 4, 4), dtype=bool))
    assert ct_app.fill_holes(np.ones((1, 4, 4), dtype=bool)).all()


def test_outline_touching_only_diagonally_still_encloses_its_holes(ct_app: ModuleType) -> None:
    size = 15
    rows, cols = np.indices((size, size))
    distance = np.abs(rows - 7) + np.abs(cols - 7)
    hu = np.where(distance == 6, 40.0, -1000.0)[None]  # a diamond outline, one pixel thick
    hu[0, 7, 7] = 40.0  # and an island inside it
    body = ct_app.segment_body(hu)
    assert np.array_equal(body[0], distance <= 6)


def test_segment_body_matches_the_phantom(ct_app: ModuleType) -> None:
    phantom = synthetic.Phantom(96, 80)
    zs = [-200.0, -150.0, -100.0]
    hu = np.stack(
        [np.asarray([synthetic.HOUNSFIELD_UNITS[t] for t in synthetic.Tissue])[phantom.labels(z)] for z in zs]
    )
    hu = hu + np.random.default_rng(1).normal(0, 10, hu.shape)
    expected = np.stack([phantom.body_mask(z) for z in zs])
    assert np.array_equal(ct_app.segment_body(hu.astype(np.float32)), expected)


# --------------------------------------------------------------------------------------------------
# Run contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((None, None, None), {}, ("/var/holoscan/input", "/var/holoscan/output", None)),
        (
            (None, None, None),
            {"MONAI_INPUTPATH": "/m/in", "MONAI_OUTPUTPATH": "/m/out", "MONAI_MODELPATH": "/m/models"},
            ("/m/in", "/m/out", "/m/models"),
        ),
        (
            (None, None, None),
            {
                "HOLOSCAN_INPUT_PATH": "/h/in",
                "HOLOSCAN_OUTPUT_PATH": "/h/out",
                "HOLOSCAN_MODEL_PATH": "/h/models",
                "MONAI_INPUTPATH": "/m/in",
                "MONAI_OUTPUTPATH": "/m/out",
            },
            ("/h/in", "/h/out", "/h/models"),
        ),
        (
            ("/a/in", "/a/out", "/a/models"),
            {"HOLOSCAN_INPUT_PATH": "/h/in"},
            ("/a/in", "/a/out", "/a/models"),
        ),
        (
            (None, None, None),
            {"HOLOSCAN_INPUT_PATH": "  ", "MONAI_INPUTPATH": "/m/in"},
            ("/m/in", "/var/holoscan/output", None),
        ),
    ],
)
def test_path_precedence(
    ct_app: ModuleType,
    args: tuple[str | None, str | None, str | None],
    env: dict[str, str],
    expected: tuple[str, str, str | None],
) -> None:
    paths = ct_app.resolve_paths(*args, env)
    assert (
        str(paths.input),
        str(paths.output),
        None if paths.model is None else str(paths.model),
    ) == expected


def test_command_line_run(study: synthetic.StudyInfo, tmp_path: Path) -> None:
    input_dir = study.paths[0].parents[1]
    out = tmp_path / "out"
    result = _run_app(["-i", str(input_dir), "-o", str(out)])
    assert result.returncode == 0, result.stderr
    # Both series have 8 slices: the tie goes to the lower SeriesNumber.
    metadata = _check_outputs(out, study, study.series[0])
    assert metadata["files_skipped"] == 1
    assert "notes.txt: not a DICOM file" in result.stdout
    assert f"chose series {study.series[0].series_uid}" in result.stdout
    assert "wrote segmentation" in result.stdout


def test_a_rerun_gives_the_same_uids(study: synthetic.StudyInfo, tmp_path: Path) -> None:
    """Re-running on the same series must not create a second, different result instance."""
    input_dir = study.paths[0].parents[1]
    uids = []
    for name in ("first", "second"):
        result = _run_app(["-i", str(input_dir), "-o", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr
        seg = pydicom.dcmread(tmp_path / name / "body_seg.dcm", stop_before_pixels=True)
        uids.append((seg.SOPInstanceUID, seg.SeriesInstanceUID))
    assert uids[0] == uids[1]
    assert uids[0][0] != uids[0][1]


@pytest.mark.parametrize(
    ("command", "transfer_syntax"),
    [
        (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70"),  # JPEG lossless, first-order prediction
        (["dcmcjpeg", "+el"], "1.2.840.10008.1.2.4.57"),  # JPEG lossless, process 14
        (["dcmcjpls"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        (["dcmcrle"], "1.2.840.10008.1.2.5"),  # RLE lossless
    ],
)
def test_compressed_series_are_read(
    study: synthetic.StudyInfo, tmp_path: Path, command: list[str], transfer_syntax: str
) -> None:
    """What mwm's DICOM server accepts (and stores as received) the app can read: series
    compressed losslessly by dcmtk, as a modality or PACS would send them."""
    program = shutil.which(command[0], path="/usr/bin")
    if program is None:
        pytest.skip(f"dcmtk's {command[0]} is not installed")
    series = study.series[0]
    folder = tmp_path / "in"
    folder.mkdir()
    for path in series.paths:
        subprocess.run([program, *command[1:], str(path), str(folder / path.name)], check=True, capture_output=True)
    assert pydicom.dcmread(folder / series.paths[0].name).file_meta.TransferSyntaxUID == transfer_syntax
    result = _run_app(["-i", str(folder), "-o", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["slice_count"] == len(series.paths)


def test_a_run_on_part_of_the_series_gives_other_uids(study: synthetic.StudyInfo, tmp_path: Path) -> None:
    """A part of the series (its late arrivals, say) makes another object: it must never take the
    UIDs of the result of the whole series, or archives would hold two objects under one UID."""
    series = study.series[0]
    part = tmp_path / "part"
    part.mkdir()
    for path in series.paths[: len(series.paths) // 2]:
        (part / path.name).write_bytes(path.read_bytes())
    uids = []
    for name, folder in (("whole", series.paths[0].parent), ("part", part)):
        result = _run_app(["-i", str(folder), "-o", str(tmp_path / f"out-{name}")])
        assert result.returncode == 0, result.stderr
        seg = pydicom.dcmread(tmp_path / f"out-{name}" / "body_seg.dcm", stop_before_pixels=True)
        uids.append((seg.SOPInstanceUID, seg.SeriesInstanceUID))
    assert uids[0][0] != uids[1][0] and uids[0][1] != uids[1][1]


def test_environment_run_creates_the_output_folder(study: synthetic.StudyInfo, tmp_path: Path) -> None:
    input_dir = study.paths[0].parents[1]
    out = tmp_path / "deep" / "er" / "out"
    result = _run_app([], env={"HOLOSCAN_INPUT_PATH": str(input_dir), "HOLOSCAN_OUTPUT_PATH": str(out)})
    assert result.returncode == 0, result.stderr
    _check_outputs(out, study, study.series[0])


def test_package_entry_point_and_legacy_environment(study: synthetic.StudyInfo, tmp_path: Path) -> None:
    input_dir = study.paths[0].parents[1]
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(CT_SAMPLE_DIR), "-l", "warning"],
        capture_output=True,
        text=True,
        env={**os.environ, "MONAI_INPUTPATH": str(input_dir), "MONAI_OUTPUTPATH": str(out)},
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # -l warning silences the progress lines
    assert (out / "metadata.json").is_file()


def test_empty_input_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see")
    result = _run_app(["-i", str(empty), "-o", str(tmp_path / "out")])
    assert result.returncode == 2
    assert "no CT image series found" in result.stderr
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_missing_input_exits_2(tmp_path: Path) -> None:
    result = _run_app(["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert result.returncode == 2
    assert "does not exist" in result.stderr


# --------------------------------------------------------------------------------------------------
# Series selection and edge cases (in process)
# --------------------------------------------------------------------------------------------------


def test_series_with_most_slices_wins_and_others_are_ignored(
    ct_app: ModuleType, study: synthetic.StudyInfo, tmp_path: Path
) -> None:
    input_dir = tmp_path / "in"
    first, second = study.series
    # Series 1 loses 3 slices; series 2 arrives twice (a duplicate copy must not count twice).
    for folder, paths in (("a", first.paths[:-3]), ("b", second.paths), ("b-again", second.paths)):
        (input_dir / folder).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, input_dir / folder / path.name)
    # An MR series with more slices is not a candidate.
    mr_dir = input_dir / "mr"
    synthetic.generate_study(mr_dir, series_count=1, instances_per_series=12, rows=16, cols=16, modality="MR")

    metadata = ct_app.run(ct_app.RunPaths(input_dir, tmp_path / "out", None))
    assert metadata["series_instance_uid"] == second.series_uid
    assert metadata["slice_count"] == SLICES
    _check_outputs(tmp_path / "out", study, second)


def test_single_slice_series(ct_app: ModuleType, tmp_path: Path) -> None:
    info = synthetic.generate_study(
        tmp_path / "in",
        series_count=1,
        instances_per_series=1,
        rows=ROWS,
        cols=COLS,
    )
    metadata = ct_app.run(ct_app.RunPaths(tmp_path / "in", tmp_path / "out", None))
    assert metadata["slice_count"] == 1
    assert metadata["slice_spacing_mm"] == info.series[0].slice_thickness
    _check_outputs(tmp_path / "out", info, info.series[0])


def test_no_ct_series_raises_input_problem(ct_app: ModuleType, tmp_path: Path) -> None:
    synthetic.generate_study(
        tmp_path / "in",
        series_count=1,
        instances_per_series=2,
        rows=8,
        cols=8,
        modality="MR",
    )
    with pytest.raises(ct_app.InputError, match="no CT image series"):
        ct_app.run(ct_app.RunPaths(tmp_path / "in", tmp_path / "out", None))
