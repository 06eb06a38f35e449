"""A streaming reader of ``multipart/related`` bodies (RFC 2046 5.1, as STOW-RS uses them) that
hands out each part's body as pieces of the buffers received, without copying them.

aiohttp's ``MultipartReader`` joins what it has buffered into new byte strings at every read and
parses each part's headers through the ``email`` package; for instances of half a megabyte
that is most of the event loop's work of an upload. Here the body of a part is a list of
``memoryview`` slices of the received buffers: the bytes are copied once, by the kernel, when
they are written to their file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

CRLF = b"\r\n"
MAX_HEADER_SIZE = 16 << 10  # the headers of one part
MAX_PREAMBLE = 64 << 10


class MalformedMultipart(ValueError):
    """The body is not a well-formed multipart body with the declared boundary."""


class ChunkSource(Protocol):
    async def readchunk(self) -> tuple[bytes, bool]: ...


class MultipartStream:
    """Parts of a multipart body, one after the other: ``async for headers in stream.parts()``,
    then ``async for piece in stream.body()`` for that part's body (or leave it: it is skipped)."""

    def __init__(self, source: ChunkSource, boundary: str) -> None:
        if not boundary or len(boundary) > 70:
            raise MalformedMultipart("the boundary must be 1 to 70 characters (RFC 2046)")
        self._source = source
        self._delimiter = CRLF + b"--" + boundary.encode("latin-1")
        # What was received and not yet consumed: _buffer[_pos:]. Positions move instead of
        # slicing, as slicing a byte string copies it.
        self._buffer = b""
        self._pos = 0
        self._eof = False
        self._in_body = False
        self._length: int | None = None  # the current part's Content-Length, when it has one
        self._done = False

    async def _read(self) -> bytes:
        """The next received buffer, or b"" at the end of the body."""
        if self._eof:
            return b""
        data, _ = await self._source.readchunk()
        if not data:
            self._eof = True
        return data

    async def _more(self) -> bool:
        """Append the next received buffer to what is left; False at the end of the body."""
        data = await self._read()
        if not data:
            return False
        rest = self._buffer[self._pos :]
        self._buffer, self._pos = (rest + data if rest else data), 0
        return True

    async def parts(self) -> AsyncIterator[dict[str, str]]:
        """Each part's headers (names lowercased), in order; the body must be read or is skipped."""
        await self._skip_preamble()
        while not self._done:
            headers = await self._headers()
            self._length = _content_length(headers)
            self._in_body = True
            yield headers
            async for _ in self.body():  # whatever the caller did not read
                pass

    async def _skip_preamble(self) -> None:
        # The first delimiter may open the body without the CRLF before it.
        opening = self._delimiter[2:]
        while True:
            if self._buffer.startswith(opening, self._pos):
                self._pos += len(opening)
                break
            found = self._buffer.find(self._delimiter, self._pos)
            if found >= 0:
                self._pos = found + len(self._delimiter)
                break
            if len(self._buffer) - self._pos > MAX_PREAMBLE:
                raise MalformedMultipart("no boundary delimiter at the start of the body")
            if not await self._more():
                raise MalformedMultipart("no boundary delimiter in the body")
        await self._after_delimiter()

    async def _after_delimiter(self) -> None:
        """After a delimiter: ``--`` closes the body; otherwise padding then CRLF start a part."""
        while len(self._buffer) - self._pos < 2 and await self._more():
            pass
        if self._buffer.startswith(b"--", self._pos):
            self._done = True
            self._buffer, self._pos = b"", 0  # the epilogue is ignored
            return
        while (end := self._buffer.find(CRLF, self._pos)) < 0:
            if len(self._buffer) - self._pos > MAX_HEADER_SIZE or not await self._more():
                raise MalformedMultipart("a boundary delimiter is not followed by a line end")
        if self._buffer[self._pos : end].strip(b" \t"):
            raise MalformedMultipart("unexpected text after a boundary delimiter")
        self._pos = end + 2

    async def _headers(self) -> dict[str, str]:
        while True:
            if self._buffer.startswith(CRLF, self._pos):  # no headers at all
                block = b""
                self._pos += 2
                break
            end = self._buffer.find(CRLF + CRLF, self._pos)
            if end >= 0:
                block = self._buffer[self._pos : end]
                self._pos = end + 4
                break
            if len(self._buffer) - self._pos > MAX_HEADER_SIZE:
                raise MalformedMultipart(f"the headers of a part are longer than {MAX_HEADER_SIZE} bytes")
            if not await self._more():
                raise MalformedMultipart("the body ends inside the headers of a part")
        if len(block) > MAX_HEADER_SIZE:
            raise MalformedMultipart(f"the headers of a part are longer than {MAX_HEADER_SIZE} bytes")
        headers: dict[str, str] = {}
        for line in block.split(CRLF) if block else ():
            name, colon, value = line.partition(b":")
            if not colon or not name.strip():
                raise MalformedMultipart("a part header line has no name")
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
        return headers

    async def body(self) -> AsyncIterator[memoryview]:
        """The current part's body, in pieces that share memory with the received buffers."""
        if not self._in_body:
            return
        if self._length is not None:
            async for piece in self._counted_body(self._length):
                yield piece
            return
        delimiter = self._delimiter
        size = len(delimiter)
        while True:
            buffer, pos = self._buffer, self._pos
            found = buffer.find(delimiter, pos)
            if found >= 0:
                if found > pos:
                    yield memoryview(buffer)[pos:found]
                self._pos = found + size
                self._in_body = False
                await self._after_delimiter()
                return
            safe = len(buffer) - (size - 1)  # a delimiter may begin in the last bytes
            if safe > pos:
                yield memoryview(buffer)[pos:safe]
                pos = safe
            tail = buffer[pos:]  # shorter than a delimiter
            data = await self._read()
            if not data:
                raise MalformedMultipart("the body ends before the closing boundary delimiter")
            if len(data) < size:  # a small buffer: join it to the tail and look again
                self._buffer, self._pos = tail + data, 0
                continue
            # Does a delimiter begin in the tail and end in the new buffer?
            starts = (tail + data[: size - 1]).find(delimiter)
            if 0 <= starts < len(tail):
                if starts:
                    yield memoryview(tail)[:starts]
                self._buffer, self._pos = data, starts + size - len(tail)
                self._in_body = False
                await self._after_delimiter()
                return
            if tail:
                yield memoryview(tail)
            self._buffer, self._pos = data, 0

    async def _counted_body(self, length: int) -> AsyncIterator[memoryview]:
        """A body whose part declared its ``Content-Length``: that many bytes, handed out without
        searching them for the delimiter, which must then follow at once."""
        left = length
        while left:
            buffer, pos = self._buffer, self._pos
            available = len(buffer) - pos
            if not available:
                data = await self._read()
                if not data:
                    raise MalformedMultipart(f"the body ends before the {length} bytes of a part's Content-Length")
                self._buffer, self._pos = data, 0
                continue
            take = min(available, left)
            yield memoryview(buffer)[pos : pos + take]
            self._pos = pos + take
            left -= take
        size = len(self._delimiter)
        while len(self._buffer) - self._pos < size and await self._more():
            pass
        if not self._buffer.startswith(self._delimiter, self._pos):
            if len(self._buffer) - self._pos < size:
                raise MalformedMultipart("the body ends before the closing boundary delimiter")
            raise MalformedMultipart("a part is not followed by the boundary delimiter where its Content-Length ends")
        self._pos += size
        self._in_body = False
        await self._after_delimiter()


def _content_length(headers: dict[str, str]) -> int | None:
    """A part's declared length, or None (absent: its end is found by the delimiter).

    Only plain decimal digits are accepted (RFC 9110 8.6); anything else is refused rather than
    guessed at."""
    value = headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise MalformedMultipart(f"invalid Content-Length of a part: {value[:40]!r}")
    return int(value)
