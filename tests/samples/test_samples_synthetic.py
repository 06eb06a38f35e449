"""Tests of ``samples/synthetic.py``, the synthetic CT study generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.uid import UID, ExplicitVRLittleEndian

ROWS = COLS = 48
INSTANCES = 5

# Attributes a strict reader of the CT Image IOD expects (Type 1 must have a value, Type 2 may be empty).
TYPE1 = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "PixelData",
]
TYPE2 = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
    "PositionReferenceIndicator",
    "SliceThickness",
    "KVP",
    "AcquisitionNumber",
    "PatientPosition",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> synthetic.StudyInfo:
    """A small default study: 2 series of 5 slices of 48x48."""
    return synthetic.generate_study(
        tmp_path_factory.mktemp("study"), instances_per_series=INSTANCES, rows=ROWS, cols=COLS
    )


def _read_all(study: synthetic.StudyInfo) -> list[list[pydicom.Dataset]]:
    return [[pydicom.dcmread(path) for path in series.paths] for series in study.series]


def test_layout_and_study_info(study: synthetic.StudyInfo) -> None:
    assert len(study.series) == 2
    assert [s.description for s in study.series] == ["AXIAL 5mm", "AXIAL 1.25mm"]
    assert len(study.paths) == 2 * INSTANCES
    assert study.paths == study.series[0].paths + study.series[1].paths
    for series in study.series:
        assert len(series.paths) == INSTANCES
        assert all(path.is_file() and path.suffix == ".dcm" for path in series.paths)
        assert {path.parent.name for path in series.paths} == {str(series.series_number)}


def test_files_are_valid_part10(study: synthetic.StudyInfo) -> None:
    for path in study.paths:
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM", "missing preamble / DICM prefix"
        ds = pydicom.dcmread(path, force=False)
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == synthetic.CT_IMAGE_STORAGE
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert UID(meta.ImplementationClassUID).is_valid
        assert meta.FileMetaInformationVersion == b"\x00\x01"


def test_ct_image_iod_attributes(study: synthetic.StudyInfo) -> None:
    ds = pydicom.dcmread(study.paths[0])
    for keyword in TYPE1:
        assert keyword in ds, keyword
        assert ds.get(keyword) not in (None, "", b""), keyword
    for keyword in TYPE2:
        assert keyword in ds, keyword
    assert ds.Modality == "CT"
    assert ds.BodyPartExamined == "CHEST"
    assert list(ds.ImageType[:2]) == ["ORIGINAL", "PRIMARY"]
    assert (ds.Rows, ds.Columns) == (ROWS, COLS)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
    assert (ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, 1, "MONOCHROME2")
    assert float(ds.RescaleIntercept) == synthetic.RESCALE_INTERCEPT
    assert float(ds.RescaleSlope) == 1.0
    assert len(ds.PixelData) == ROWS * COLS * 2
    assert ds.pixel_array.dtype == np.int16


def test_uids_are_valid_and_consistent(study: synthetic.StudyInfo) -> None:
    datasets = _read_all(study)
    flat = [ds for series in datasets for ds in series]
    for ds in flat:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            assert UID(ds.get(keyword)).is_valid, keyword
    assert {ds.StudyInstanceUID for ds in flat} == {study.study_uid}
    assert {ds.FrameOfReferenceUID for ds in flat} == {study.frame_of_reference_uid}
    assert {ds.PatientID for ds in flat} == {study.patient_id}
    assert {ds.AccessionNumber for ds in flat} == {flat[0].AccessionNumber}
    for info, series in zip(study.series, datasets, strict=True):
        assert {ds.SeriesInstanceUID for ds in series} == {info.series_uid}
        assert {ds.SeriesNumber for ds in series} == {info.series_number}
        assert {ds.SeriesDescription for ds in series} == {info.description}
    assert len({info.series_uid for info in study.series}) == 2
    assert len({ds.SOPInstanceUID for ds in flat}) == len(flat)
    assert study.frame_of_reference_uid not in {info.series_uid for info in study.series}


def test_slices_are_contiguous_along_z(study: synthetic.StudyInfo) -> None:
    for info, series in zip(study.series, _read_all(study), strict=True):
        thickness = float(series[0].SliceThickness)
        assert thickness == info.slice_thickness
        assert [ds.InstanceNumber for ds in series] == list(range(1, INSTANCES + 1))
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in series])
        np.testing.assert_allclose(np.diff(z), thickness)
        np.testing.assert_allclose(z, info.z_positions)
        np.testing.assert_allclose([float(ds.SliceLocation) for ds in series], z)
        for ds in series:
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.ImagePositionPatient[:2]] == [
                float(v) for v in series[0].ImagePositionPatient[:2]
            ]
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx([study.pixel_spacing] * 2)
    # Both series image the same anatomy around the same table position.
    centres = [np.mean(info.z_positions) for info in study.series]
    assert centres[0] == pytest.approx(centres[1])


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = synthetic.generate_study(tmp_path / "a", instances_per_series=3, rows=32, cols=32, seed=7)
    second = synthetic.generate_study(tmp_path / "b", instances_per_series=3, rows=32, cols=32, seed=7)
    assert first.study_uid == second.study_uid
    assert [s.series_uid for s in first.series] == [s.series_uid for s in second.series]
    for a, b in zip(first.paths, second.paths, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_other_seed_gives_other_uids_and_noise(tmp_path: Path) -> None:
    first = synthetic.generate_study(tmp_path / "a", instances_per_series=3, rows=32, cols=32, seed=1)
    second = synthetic.generate_study(tmp_path / "b", instances_per_series=3, rows=32, cols=32, seed=2)
    assert first.study_uid != second.study_uid
    assert first.patient_id != second.patient_id
    assert first.frame_of_reference_uid != second.frame_of_reference_uid
    assert not {s.series_uid for s in first.series} & {s.series_uid for s in second.series}
    sops_a = {pydicom.dcmread(p).SOPInstanceUID for p in first.paths}
    sops_b = {pydicom.dcmread(p).SOPInstanceUID for p in second.paths}
    assert not sops_a & sops_b
    pixels_a = pydicom.dcmread(first.paths[0]).pixel_array
    pixels_b = pydicom.dcmread(second.paths[0]).pixel_array
    assert not np.array_equal(pixels_a, pixels_b)


def test_explicit_identifiers_are_used(tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.1234567890"
    info = synthetic.generate_study(
        tmp_path,
        series_count=1,
        instances_per_series=2,
        rows=16,
        cols=16,
        patient_id="PAT-42",
        study_uid=study_uid,
        series_descriptions=["THIN 3mm"],
        body_part="abdomen",
    )
    ds = pydicom.dcmread(info.paths[1])
    assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesDescription) == ("PAT-42", study_uid, "THIN 3mm")
    assert ds.BodyPartExamined == "ABDOMEN"
    assert float(ds.SliceThickness) == 3.0
    assert info.series[0].z_positions[1] - info.series[0].z_positions[0] == pytest.approx(3.0)


def test_full_size_file_is_half_a_megabyte(tmp_path: Path) -> None:
    info = synthetic.generate_study(tmp_path, series_count=1, instances_per_series=2)
    for path in info.paths:
        size = path.stat().st_size
        assert 512 * 512 * 2 < size < 512 * 512 * 2 + 8192
    assert pydicom.dcmread(info.paths[0]).pixel_array.shape == (512, 512)


def _hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_hounsfield_units_of_each_tissue(tmp_path: Path) -> None:
    info = synthetic.generate_study(tmp_path, series_count=1, instances_per_series=3, rows=128, cols=128)
    phantom = synthetic.Phantom(128, 128)
    for path, z in zip(info.paths, info.series[0].z_positions, strict=True):
        hu = _hounsfield(pydicom.dcmread(path))
        labels = phantom.labels(z)
        for tissue, expected in synthetic.HOUNSFIELD_UNITS.items():
            values = hu[labels == tissue]
            assert values.size > 0, f"{tissue.name} missing from the slice"
            assert abs(np.median(values) - expected) <= 3, tissue.name
            assert np.all(np.abs(values - expected) <= 4 * synthetic.NOISE_SIGMA), tissue.name
        assert 5 < np.std(hu[labels == synthetic.Tissue.SOFT_TISSUE]) < 15


def test_anatomy_is_where_expected(tmp_path: Path) -> None:
    info = synthetic.generate_study(tmp_path, series_count=1, instances_per_series=1, rows=256, cols=256)
    ds = pydicom.dcmread(info.paths[0])
    hu = _hounsfield(ds)
    x0, y0 = (float(v) for v in ds.ImagePositionPatient[:2])
    spacing = float(ds.PixelSpacing[0])

    def at(x_mm: float, y_mm: float) -> float:
        """Mean HU of a 3x3 neighbourhood around a patient (x, y) position."""
        col, row = round((x_mm - x0) / spacing), round((y_mm - y0) / spacing)
        return float(hu[row - 1 : row + 2, col - 1 : col + 2].mean())

    assert at(-200, -200) == pytest.approx(-1000, abs=15)  # air, anterior right corner
    assert at(0, -60) == pytest.approx(40, abs=15)  # mediastinum: soft tissue
    assert at(-80, -5) == pytest.approx(-800, abs=15)  # right lung
    assert at(80, -5) == pytest.approx(-800, abs=15)  # left lung
    assert at(0, 75) == pytest.approx(250, abs=15)  # vertebral body: cancellous bone
    assert at(0, 75 + 16.5) == pytest.approx(700, abs=15)  # cortical ring
    assert at(0, 159) == pytest.approx(150, abs=15)  # table, under the patient
    assert at(0, 140) == pytest.approx(-1000, abs=15)  # air gap between body and table


def test_phantom_changes_smoothly_along_z() -> None:
    phantom = synthetic.Phantom(64, 64)
    areas = [int(np.count_nonzero(phantom.labels(z) == synthetic.Tissue.LUNG)) for z in range(-300, 0, 10)]
    assert len(set(areas)) > 5, "slices should differ"
    assert max(np.abs(np.diff(areas))) < 0.2 * max(areas), "consecutive slices should be similar"
    body = phantom.body_mask(-150.0)
    labels = phantom.labels(-150.0)
    assert not body[labels == synthetic.Tissue.TABLE].any()
    assert body[labels == synthetic.Tissue.LUNG].all()
    no_lungs = synthetic.Phantom(64, 64, body_part="ABDOMEN").labels(-150.0)
    assert not (no_lungs == synthetic.Tissue.LUNG).any()


def test_mr_modality(tmp_path: Path) -> None:
    info = synthetic.generate_study(
        tmp_path,
        series_count=1,
        instances_per_series=2,
        rows=32,
        cols=32,
        modality="mr",
    )
    ds = pydicom.dcmread(info.paths[0])
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == synthetic.MR_IMAGE_STORAGE
    assert ds.Modality == "MR"
    assert ds.PixelRepresentation == 0
    assert "RescaleIntercept" not in ds
    assert ds.pixel_array.min() >= 0
    for keyword in ("ScanningSequence", "SequenceVariant", "MRAcquisitionType", "MagneticFieldStrength"):
        assert keyword in ds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"series_count": 0}, "series_count"),
        ({"instances_per_series": 0}, "instances_per_series"),
        ({"modality": "US"}, "modality"),
        ({"study_uid": "not-a-uid"}, "UID"),
        ({"series_count": 2, "series_descriptions": ["only one"]}, "series_descriptions"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic.generate_study(tmp_path, rows=8, cols=8, **kwargs)  # type: ignore[arg-type]


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        str(tmp_path),
        "--studies",
        "2",
        "--series",
        "1",
        "--instances",
        "2",
        "--rows",
        "16",
        "--cols",
        "16",
    ]
    assert synthetic.main([*argv, "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 files" in out
    studies = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in studies] == ["study_001", "study_002"]
    uids = {pydicom.dcmread(next(p.rglob("*.dcm"))).StudyInstanceUID for p in studies}
    assert uids == {synthetic.study_uid_for(5), synthetic.study_uid_for(6)}


def test_cli_as_script(tmp_path: Path) -> None:
    script = Path(synthetic.__file__)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path),
            "--series",
            "1",
            "--instances",
            "2",
            "--rows",
            "16",
            "--cols",
            "16",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 files" in result.stdout
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.dcm")) == [
        "1/0001.dcm",
        "1/0002.dcm",
    ]
