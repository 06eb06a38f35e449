"""The streaming multipart/related reader: every way of splitting a body gives the same parts."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mwm.multipart import MalformedMultipart, MultipartStream


class Chunks:
    """A ``readchunk`` source handing out the given pieces, then the end."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    async def readchunk(self) -> tuple[bytes, bool]:
        return (self.pieces.pop(0) if self.pieces else b""), False


def encode(parts: list[tuple[dict[str, str], bytes]], boundary: str, *, preamble: bytes = b"") -> bytes:
    out = [preamble + (b"\r\n" if preamble else b"")]
    for headers, body in parts:
        out.append(f"--{boundary}\r\n".encode())
        out.extend(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        out.append(b"\r\n" + body + b"\r\n")
    out.append(f"--{boundary}--\r\nepilogue".encode())
    return b"".join(out)


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points) if b > a]


async def read_all(pieces: list[bytes], boundary: str, *, skip: set[int] = frozenset()) -> list[tuple[dict, bytes]]:
    stream = MultipartStream(Chunks(pieces), boundary)
    out = []
    index = 0
    async for headers in stream.parts():
        if index in skip:
            out.append((headers, None))
        else:
            out.append((headers, b"".join([bytes(p) async for p in stream.body()])))
        index += 1
    return out


BOUNDARY = st.text(alphabet="abcXYZ0123456789'()+_,-./:=?", min_size=1, max_size=70).filter(lambda b: b[-1] != " ")
# Bodies built from pieces that look like the delimiter, so near-misses and straddles are common.
BODY = st.lists(st.sampled_from([b"\r", b"\n", b"-", b"--", b"\r\n--", b"x", b"ab", b"\0" * 5]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    boundary=BOUNDARY,
    bodies=st.lists(BODY, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    preamble=st.sampled_from([b"", b"ignored preamble"]),
    counted=st.lists(st.booleans(), min_size=4, max_size=4),
)
async def test_any_split_gives_the_parts_back(boundary, bodies, cuts, preamble, counted) -> None:
    """With or without a Content-Length for each part (found by its length, or by searching)."""
    parts = []
    for i, pieces in enumerate(bodies):
        body = b"".join(pieces)
        if (b"\r\n--" + boundary.encode()) in (b"\r\n" + body + b"\r\n"):
            return  # a body that contains the delimiter cannot be sent with this boundary
        headers = {"content-type": "application/dicom", "x-n": str(i)}
        if counted[i]:
            headers["content-length"] = str(len(body))
        parts.append((headers, body))
    encoded = encode(parts, boundary, preamble=preamble)
    assert await read_all(split(encoded, cuts), boundary) == parts


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 3000), max_size=8))
async def test_parts_left_unread_are_skipped(cuts) -> None:
    parts = [({"content-type": "text/plain"}, b"a" * 700), ({"content-type": "application/dicom"}, b"b" * 900)]
    got = await read_all(split(encode(parts, "B"), cuts), "B", skip={0})
    assert got == [(parts[0][0], None), parts[1]]


async def test_large_buffers_are_handed_out_without_copies() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    encoded = encode([({"content-type": "application/dicom"}, body)], "q")
    head, rest = encoded[:200_000], encoded[200_000:]
    stream = MultipartStream(Chunks([head, rest]), "q")
    async for _ in stream.parts():
        pieces = [p async for p in stream.body()]
        assert b"".join(pieces) == body
        assert pieces[-1].obj is rest  # a view of the buffer received, not a copy


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no delimiter at all", "no boundary delimiter"),
        (b"--B\r\nContent-Type: x\r\n\r\nbody without end", "ends before the closing"),
        (b"--B\r\nContent-Type: x", "ends inside the headers"),
        (b"--B\r\nno colon here\r\n\r\nbody\r\n--B--", "has no name"),
        (b"--Bjunk\r\n\r\nbody\r\n--B--", "unexpected text after a boundary"),
        (b"--B\r\n" + b"X-Long: " + b"a" * 20_000 + b"\r\n\r\nbody\r\n--B--", "longer than"),
        (b"--B\r\nContent-Length: 3\r\n\r\nbody\r\n--B--", "where its Content-Length ends"),
        (b"--B\r\nContent-Length: 5\r\n\r\nbody\r\n--B--", "where its Content-Length ends"),
        (b"--B\r\nContent-Length: 50\r\n\r\nbody\r\n--B--", "ends before the 50 bytes of a part's Content-Length"),
        (b"--B\r\nContent-Length: 4\r\n\r\nbody", "ends before the closing"),
        (b"--B\r\nContent-Length: -4\r\n\r\nbody\r\n--B--", "invalid Content-Length"),
        (b"--B\r\nContent-Length: 1e3\r\n\r\nbody\r\n--B--", "invalid Content-Length"),
    ],
)
async def test_malformed_bodies_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(MalformedMultipart, match=message):
        await read_all([body[i : i + 7] for i in range(0, len(body), 7)], "B")


async def test_a_counted_body_is_not_searched_for_the_delimiter() -> None:
    """A part that declares its length ends there, even where its bytes look like a delimiter
    (aiohttp's reader does the same); a later part without a length is searched as before."""
    tricky = b"a\r\n--B\r\nz"
    body = b"--B\r\nContent-Length: %d\r\n\r\n%s\r\n--B\r\n\r\nplain\r\n--B--" % (len(tricky), tricky)
    for size in (1, 3, 7, len(body)):
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        assert await read_all(pieces, "B") == [({"content-length": str(len(tricky))}, tricky), ({}, b"plain")]


async def test_counted_large_buffers_are_handed_out_without_copies() -> None:
    body = bytes(range(256)) * 4096
    encoded = encode([({"content-length": str(len(body))}, body)], "q")
    head, rest = encoded[:200_000], encoded[200_000:]
    stream = MultipartStream(Chunks([head, rest]), "q")
    async for _ in stream.parts():
        pieces = [p async for p in stream.body()]
        assert b"".join(pieces) == body
        assert [p.obj for p in pieces] == [head, rest]


async def test_empty_parts_and_parts_without_headers() -> None:
    body = b"--B\r\n\r\n\r\n--B\r\nA: 1\r\n\r\nx\r\n--B--"
    assert await read_all([body], "B") == [({}, b""), ({"a": "1"}, b"x")]


def test_boundaries_must_be_valid() -> None:
    with pytest.raises(MalformedMultipart):
        MultipartStream(Chunks([]), "")
    with pytest.raises(MalformedMultipart):
        MultipartStream(Chunks([]), "x" * 71)
