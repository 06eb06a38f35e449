"""The ceiling for ``benchmarks/upload.py``: the least an HTTP server can do to receive DICOM uploads.

It accepts the requests mwm accepts on ``POST /v1/instances`` (a single ``application/dicom`` body
or a ``multipart/related`` body of such parts), writes every part to its own file with a plain
buffered write (no fsync, no parsing, no database) and answers with a JSON body of the same shape
as mwm's. Whatever mwm does on top of this (parse headers, hash, fsync, rename, record in SQLite,
discover applications, open buckets) is what the benchmark's ratio measures.

With ``--fsync`` it also flushes every file, and the folder once per request, before answering:
the least a server must add to acknowledge only what is on disk (shown for information).

Run: ``python benchmarks/ceiling_server.py --port 8765 --dir /tmp/ceiling``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from aiohttp import BodyPartReader, web

CHUNK = 1 << 20


def _answer(count: int) -> web.Response:
    body = {
        "instances": [{"status": "stored", "sop_instance_uid": None} for _ in range(count)],
        "stored": count,
        "duplicate": 0,
        "rejected": 0,
        "failed": 0,
    }
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, separators=(",", ":")))


def _flush(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def make_app(folder: Path, *, flush: bool = False) -> web.Application:
    """``flush``: each file is flushed to disk (fsync) before the answer, and the folder once per
    request: the least a server that acknowledges only what is on disk must add."""
    folder.mkdir(parents=True, exist_ok=True)
    names = itertools.count(1)

    def done() -> None:
        if flush:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def upload(request: web.Request) -> web.Response:
        if request.content_type == "application/dicom":
            with open(folder / f"{next(names):08d}.dcm", "wb") as f:
                async for chunk in request.content.iter_chunked(CHUNK):
                    f.write(chunk)
                if flush:
                    _flush(f)
            done()
            return _answer(1)
        if request.content_type != "multipart/related":
            return web.json_response({"error": "unsupported_media_type"}, status=415)
        reader = await request.multipart()
        count = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                return web.json_response({"error": "bad_request", "message": "nested multipart"}, status=400)
            with open(folder / f"{next(names):08d}.dcm", "wb") as f:
                while chunk := await part.read_chunk(CHUNK):
                    f.write(chunk)
                if flush:
                    _flush(f)
            count += 1
        done()
        return _answer(count)

    app = web.Application(client_max_size=2 * 2**30)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/instances", upload)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Minimal upload server: the ceiling mwm is compared with.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="folder the received parts are written to")
    parser.add_argument("--fsync", action="store_true", help="flush every file (and the folder) before answering")
    args = parser.parse_args(argv)
    web.run_app(make_app(args.dir, flush=args.fsync), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
