"""Bad input, generated: property tests on UIDs and header extraction, and a fuzz run over upload."""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import base_config, post_raw, upload_files

from mwm.errors import InvalidDicom
from mwm.headers import _from_walk, _raw, read_headers
from mwm.storage import check_key
from mwm.uids import is_valid_uid

UID_COMPONENT = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,8}", fullmatch=True))


@given(st.lists(UID_COMPONENT, min_size=2, max_size=8))
def test_valid_uids_are_accepted_and_make_safe_keys(components: list[str]) -> None:
    uid = ".".join(components)
    if len(uid) <= 64:
        assert is_valid_uid(uid)
        check_key(f"instances/{uid}/{uid}/{uid}.dcm")  # never raises for a valid UID
    else:
        assert not is_valid_uid(uid)


@given(st.text(max_size=80))
def test_anything_accepted_as_a_uid_is_digits_and_dots(text: str) -> None:
    if is_valid_uid(text):
        assert set(text) <= set("0123456789.") and len(text) <= 64
        assert ".." not in text and not text.startswith(".") and not text.endswith(".")
        assert all(part == "0" or not part.startswith("0") for part in text.split("."))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    import synthetic

    study = synthetic.generate_study(
        tmp_path_factory.mktemp("fuzz"), series_count=1, instances_per_series=1, rows=32, cols=32, seed=4
    )
    return study.paths[0].read_bytes()


def corrupt(good: bytes, data: st.DataObject, most: int) -> bytearray:
    """A copy of ``good`` with 1 to ``most`` random flips, cuts, insertions or overwritten lengths."""
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, most))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        pos = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[pos : pos + data.draw(st.integers(1, 64))]
        elif kind == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
        else:
            blob[pos : pos + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 0xFFFFFFFF, 0x7FFFFFFF, 3])))
    return blob


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_header_extraction_never_fails_unexpectedly(good_file: bytes, data) -> None:
    """Random corruption of a valid file: either valid headers or InvalidDicom, nothing else."""
    blob = corrupt(good_file, data, 8)
    try:
        headers = read_headers(bytes(blob))
    except InvalidDicom as exc:
        assert exc.message
    else:
        assert is_valid_uid(headers.sop_instance_uid) and is_valid_uid(headers.study_instance_uid)


# -- malformed Part-10 files, made on purpose --------------------------------------------------------------


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element; ``length`` overrides the real length."""
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", n) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", n & 0xFFFF) + value


def meta(group_length: int | None = None) -> bytes:
    ts = b"1.2.840.10008.1.2.1\0"
    body = element(0x0002, 0x0010, b"UI", ts)
    length = len(body) if group_length is None else group_length
    return element(0x0002, 0x0000, b"UL", struct.pack("<I", length)) + body


def part10(
    dataset: bytes, *, preamble: bytes = b"\0" * 128, magic: bytes = b"DICM", group_length: int | None = None
) -> bytes:
    return preamble + magic + meta(group_length) + dataset


def uids() -> bytes:
    return (
        element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0")
        + element(0x0008, 0x0018, b"UI", b"1.2.3.4\0")
        + element(0x0020, 0x000D, b"UI", b"1.2.3\0")
        + element(0x0020, 0x000E, b"UI", b"1.2.3.5\0")
    )


def nested(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        inner = (
            struct.pack("<HH", 0x0040, 0xA730)
            + b"SQ\0\0"
            + struct.pack("<I", 0xFFFFFFFF)
            + item
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )
    return inner


def malformed(good: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    cases = [
        ("bad preamble magic", part10(uids(), magic=b"DICX")),
        ("no preamble", good[128:]),
        ("wrong group length (long)", part10(uids(), group_length=100_000)),
        ("wrong group length (short)", part10(uids(), group_length=4)),
        (
            "undefined length that never ends",
            part10(
                uids()
                + struct.pack("<HH", 0x7FE0, 0x0010)
                + b"OB\0\0"
                + struct.pack("<I", 0xFFFFFFFF)
                + struct.pack("<HHI", 0xFFFE, 0xE000, 16)
                + b"x" * 16
            ),
        ),
        ("deeply nested sequences", part10(uids() + nested(400))),
        ("very deeply nested sequences", part10(uids() + nested(3000))),
        ("huge element length", part10(uids() + element(0x7FE0, 0x0010, b"OB", b"abc", length=0x7FFFFFF0))),
        ("huge text length", part10(element(0x0008, 0x0018, b"UT", b"1.2", length=0xFFFFFFF0))),
        ("only a preamble", b"\0" * 128 + b"DICM"),
        ("random bytes", bytes(rng.getrandbits(8) for _ in range(2000))),
        ("zeros", b"\0" * 5000),
    ]
    for i in range(60):  # random damage to a valid file
        blob = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(blob))
            blob[pos : pos + rng.randint(1, 8)] = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 8)))
        cases.append((f"damaged copy {i}", bytes(blob)))
    return cases


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_fuzz_run_over_the_upload_endpoint(tmp_path, make_service, client_for, good_file, small_study):
    service = await make_service(
        base_config(
            tmp_path, server={"max_instance_size": "4MiB"}, apps=[{"id": "ct", "command": ["true"], "timeout": "1h"}]
        )
    )
    client = await client_for(service)
    rng = random.Random(20261128)
    cases = malformed(good_file, rng)
    before = rss_mib()
    statuses: dict[int, int] = {}
    tried = 0
    for _ in range(3):  # three rounds, to see memory settle
        for name, body in cases:
            status, answer = await post_raw(client, body)
            tried += 1
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (name, answer)
            if status != 200:
                assert status == 400 and answer["instances"][0]["reason"], (name, answer)
            else:  # damage that left a valid instance: stored as sent
                uid = answer["instances"][0]["sop_instance_uid"]
                assert (await client.get(f"/v1/instances/{uid}"))["size"] == len(body)
    grown = rss_mib() - before
    assert grown < 100, f"memory grew by {grown:.0f} MiB over {tried} bad inputs"
    assert statuses.get(400, 0) >= len(cases) * 3 // 2
    # The service keeps serving others, and nothing was left in staging.
    status, answer = await upload_files(client, small_study.paths)
    assert status == 200 and answer["stored"] == len(small_study.paths)
    assert os.listdir(service.settings.staging_dir) == []
    print(f"\nfuzz: {tried} bad inputs, statuses {statuses}, memory {grown:+.1f} MiB")


def test_pydicom_still_reads_our_good_file(good_file: bytes) -> None:
    assert pydicom.dcmread(io.BytesIO(good_file)).SOPInstanceUID


# -- the fast reader agrees with pydicom wherever it answers -----------------------------------------------

SEED_FILES = (
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "JPEG2000.dcm",
    "reportsi.dcm",
    "MR_small_RLE.dcm",
    "JPEG-lossy.dcm",
)


def _pydicom_headers(blob: bytes) -> dict[str, str] | None:
    """What pydicom itself reads for the attributes mwm records (None when it cannot read the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(blob), defer_size=4096)
        names = {
            "sop_instance_uid": "SOPInstanceUID",
            "sop_class_uid": "SOPClassUID",
            "study_instance_uid": "StudyInstanceUID",
            "series_instance_uid": "SeriesInstanceUID",
            "patient_id": "PatientID",
            "modality": "Modality",
            "series_description": "SeriesDescription",
            "body_part": "BodyPartExamined",
            "study_date": "StudyDate",
            "accession_number": "AccessionNumber",
        }
        out = {name: (_raw(ds, keyword) or "")[:256] for name, keyword in names.items()}
        out["transfer_syntax_uid"] = _raw(ds.file_meta, "TransferSyntaxUID")
        return out
    except Exception:  # noqa: BLE001 - any failure means pydicom cannot read it
        return None


@pytest.fixture(scope="module", params=["synthetic", *SEED_FILES])
def seed_file(request, good_file: bytes) -> bytes:
    if request.param == "synthetic":
        return good_file
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(request.param)).read_bytes()


def test_fast_reader_reads_every_seed_file(seed_file: bytes) -> None:
    """Valid files in every common layout (explicit and implicit VR, encapsulated pixel data, an SR
    with nested sequences of undefined length) are read by the fast path, exactly as pydicom reads them."""
    fast = _from_walk(seed_file)
    assert fast is not None
    assert fast.as_dict() == _pydicom_headers(seed_file)
    assert read_headers(seed_file) == fast


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fast_reader_never_accepts_what_pydicom_reads_differently(seed_file: bytes, data) -> None:
    blob = corrupt(seed_file, data, 4)
    fast = _from_walk(bytes(blob))
    if fast is not None:
        assert fast.as_dict() == _pydicom_headers(bytes(blob))
