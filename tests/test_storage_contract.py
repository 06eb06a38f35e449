"""The ``Storage`` contract, run against every implementation available here.

``s3`` and ``s3-https`` run against a local S3 server (moto) over HTTP, and over HTTPS with a
self-signed certificate that ``ca_bundle`` trusts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from s3.servers import moto_http, moto_https  # noqa: F401 - fixtures

from mwm.errors import StorageError, StorageFull
from mwm.options import build
from mwm.storage import Storage, check_key
from mwm.storage.local import LocalOptions, LocalStorage


def _s3_storage(request, tmp_path) -> Storage:
    server = request.getfixturevalue("moto_https" if request.param == "s3-https" else "moto_http")  # or skip
    from mwm.storage.s3 import S3Options, S3Storage

    options = server.storage_options(server.new_bucket(), prefix="contract")
    options.pop("kind")
    return S3Storage(build(S3Options, options, "storage"), data_dir=tmp_path)


@pytest.fixture(params=["local", "s3", "s3-https"])
async def storage(request, tmp_path) -> AsyncIterator[Storage]:
    if request.param == "local":
        store: Storage = LocalStorage(LocalOptions(path=tmp_path / "store"), data_dir=tmp_path)
    else:
        store = _s3_storage(request, tmp_path)
    await store.open()
    yield store
    await store.close()


async def test_put_get_and_list(storage, tmp_path) -> None:
    await storage.put_bytes("a/b/one.bin", b"1" * 10)
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 << 20))
    await storage.put_file("a/c/two.bin", source)
    assert source.exists()  # copied, not consumed
    assert await storage.get_bytes("a/b/one.bin") == b"1" * 10
    assert await storage.size("a/c/two.bin") == 3 << 20
    streamed = b"".join([chunk async for chunk in storage.stream("a/c/two.bin", chunk_size=1 << 20)])
    assert streamed == source.read_bytes()
    assert await storage.list("a") == ["a/b/one.bin", "a/c/two.bin"]
    assert await storage.exists("a/b/one.bin") and not await storage.exists("a/b/none.bin")
    dest = tmp_path / "fetched" / "two.bin"
    await storage.fetch("a/c/two.bin", dest)
    assert dest.read_bytes() == source.read_bytes()
    await storage.delete("a/b/one.bin")
    await storage.delete("a/b/one.bin")  # idempotent
    assert not await storage.exists("a/b/one.bin")
    with pytest.raises(StorageError):
        await storage.get_bytes("a/b/one.bin")


async def test_move_consumes_the_source(storage, tmp_path) -> None:
    source = tmp_path / "staged.bin"
    source.write_bytes(b"x" * 100)
    await storage.put_file("k/staged.bin", source, move=True)
    assert not source.exists()
    assert await storage.get_bytes("k/staged.bin") == b"x" * 100


async def test_overwrite_is_atomic_for_readers(storage) -> None:
    await storage.put_bytes("k/v", b"old" * 100_000)

    async def reader() -> set[bytes]:
        seen = set()
        for _ in range(50):
            seen.add((await storage.get_bytes("k/v"))[:3])
            await asyncio.sleep(0)
        return seen

    writer = asyncio.gather(*(storage.put_bytes("k/v", b"new" * 100_000) for _ in range(10)))
    seen, _ = await asyncio.gather(reader(), writer)
    assert seen <= {b"old", b"new"}
    assert await storage.get_bytes("k/v") == b"new" * 100_000


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../b", ".hidden", "a/.", "", "a/b c", "x" * 1100])
async def test_keys_from_outside_are_refused(storage, key) -> None:
    with pytest.raises(StorageError):
        check_key(key)
    with pytest.raises(StorageError):
        await storage.put_bytes(key, b"x")


async def test_local_storage_reports_a_full_disk(tmp_path, monkeypatch) -> None:
    import errno

    store = LocalStorage(LocalOptions(path=tmp_path / "s"), data_dir=tmp_path)
    await store.open()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shutil.copyfile", full)
    source = tmp_path / "f"
    source.write_bytes(b"x")
    with pytest.raises(StorageFull):
        await store.put_file("a/b", source)
    assert not (tmp_path / "s" / "a" / "b").exists()
    assert list((tmp_path / "s" / ".tmp").iterdir()) == []


async def test_local_storage_cleans_half_written_files_at_start(tmp_path) -> None:
    root = tmp_path / "s"
    (root / ".tmp").mkdir(parents=True)
    (root / ".tmp" / "crashed.part").write_bytes(b"half")
    store = LocalStorage(LocalOptions(path=root), data_dir=tmp_path)
    await store.open()
    assert list((root / ".tmp").iterdir()) == []
    assert isinstance(store.local_path("a/b"), Path)


async def test_placing_stores_the_bytes_or_declines(storage, tmp_path) -> None:
    """``place_blocking`` either stores (the kinds that keep files here) or declines, never half-does;
    what it placed is under its key, whole, once ``sync_blocking`` has returned."""
    data = os.urandom(300_000)
    placed_bytes = await asyncio.to_thread(storage.place_blocking, "placed/from-memory.dcm", data)
    source = tmp_path / "received.dcm"
    source.write_bytes(data[::-1])
    placed_file = await asyncio.to_thread(storage.place_blocking, "placed/from-file.dcm", source)
    assert placed_bytes == placed_file == storage.places_files
    await asyncio.to_thread(storage.sync_blocking, ["placed/from-memory.dcm", "placed/from-file.dcm"])
    if storage.places_files:
        assert await storage.get_bytes("placed/from-memory.dcm") == data
        assert await storage.get_bytes("placed/from-file.dcm") == data[::-1]
        assert not source.exists()  # moved, not copied
        assert os.listdir(storage.tmp) == []  # type: ignore[attr-defined]
    else:
        assert not await storage.exists("placed/from-memory.dcm")
        assert source.read_bytes() == data[::-1]  # left for put_staged


async def test_local_sync_flushes_through_the_file_system_or_each_file(tmp_path, monkeypatch) -> None:
    import mwm.storage.local as local

    calls: list[str] = []
    store = LocalStorage(LocalOptions(path=tmp_path / "store"), data_dir=tmp_path)
    await store.open()
    store.place_blocking("a/b/one.dcm", b"one")
    store.place_blocking("a/c/two.dcm", b"two")
    monkeypatch.setattr(local, "_syncfs", lambda fd: calls.append("syncfs") or 0)
    store.sync_blocking(["a/b/one.dcm", "a/c/two.dcm"])
    assert calls == ["syncfs"]  # one flush for the whole batch
    monkeypatch.setattr(local, "_syncfs", None)
    monkeypatch.setattr(local, "_fsync_path", lambda path: calls.append(f"file {path.name}"))
    monkeypatch.setattr(local, "fsync_dir", lambda path: calls.append(f"folder {path.name}"))
    store.sync_blocking(["a/b/one.dcm", "a/c/two.dcm"])
    assert calls[1:] == ["file one.dcm", "file two.dcm", "folder b", "folder c"]
    failing = LocalStorage(LocalOptions(path=tmp_path / "store"), data_dir=tmp_path)
    monkeypatch.setattr(local, "_syncfs", lambda fd: -1)
    monkeypatch.setattr(local.ctypes, "get_errno", lambda: 5)
    with pytest.raises(StorageError, match="storage write failed"):
        failing.sync_blocking(["a/b/one.dcm"])
