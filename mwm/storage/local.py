"""Local-filesystem storage: write to a temporary name, flush, rename."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..errors import StorageError, StorageFull
from ..naming import UniqueNames
from . import Storage, StorageUsage, check_key


@dataclass(frozen=True)
class LocalOptions:
    path: Path | None = None  # default: <data_dir>/storage
    fsync: bool = True


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(2)`` (not in the ``os`` module); None where the C library lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


_syncfs = _load_syncfs()
SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range(2)``, used only to start writeback early; None where missing."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_start_writeback = _load_sync_file_range()


Bytes = bytes | bytearray | memoryview
IOV_MAX = 1024  # buffers one writev(2) accepts (Linux)


def _write_all(fd: int, buffers: list[Bytes]) -> None:
    """Write the buffers one after the other, in as few system calls as possible (no joining)."""
    while buffers:
        written = os.writev(fd, buffers[:IOV_MAX])
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers.pop(0)
        if written:
            buffers[0] = memoryview(buffers[0])[written:]


def _raise_os_error(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull("storage is full", f"{what}: {exc.strerror}") from exc
    raise StorageError("storage write failed", f"{what}: {exc.strerror or exc}") from exc


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # the data and the size; the name is made durable by flushing the folder
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """Files under a root folder; keys are relative paths checked segment by segment."""

    kind = "local"
    Options = LocalOptions
    places_files = True

    def __init__(self, options: LocalOptions, *, data_dir: Path) -> None:
        super().__init__(options, data_dir=data_dir)
        self.root = (options.path or data_dir / "storage").absolute()
        self.tmp = self.root / ".tmp"
        self.fsync = options.fsync
        self._known_dirs: set[Path] = set()
        # Temporary names: the .tmp folder is emptied at every start, so a counter is unique.
        self._temp_names = UniqueNames()
        self._root_name = str(self.root)
        self._tmp_name = str(self.tmp)
        self._known_folder_names: set[str] = set()

    async def open(self) -> None:
        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(exist_ok=True)
            for leftover in self.tmp.iterdir():  # half-written files from a crash
                leftover.unlink(missing_ok=True)
            probe = self.tmp / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()

        try:
            await asyncio.to_thread(prepare)
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} is not usable", str(exc)) from exc

    def path_of(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self.path_of(key)

    def _ensure_parent(self, target: Path) -> None:
        parent = target.parent
        if parent in self._known_dirs:
            return
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for created in reversed(missing):
                fsync_dir(created.parent)
        self._known_dirs.add(parent)

    def _commit(self, temp: Path, target: Path) -> None:
        self._ensure_parent(target)
        os.replace(temp, target)
        if self.fsync:
            fsync_dir(target.parent)

    def _put_file(self, key: str, source: Path, move: bool) -> None:
        target = self.path_of(key)
        if move and self._move(source, target):
            return
        temp = self.tmp / f"{self._temp_names.next()}.part"
        try:
            shutil.copyfile(source, temp)
            if self.fsync:
                _fsync_path(temp)
            self._commit(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            _raise_os_error(exc, key)
        if move:
            source.unlink(missing_ok=True)

    def _move(self, source: Path, target: Path, sync_name: bool = True, flush: bool = True) -> bool:
        """Rename a file already on this file system into place (flushed first unless not ``flush``);
        False if it is not on this file system."""
        try:
            if self.fsync and flush:
                _fsync_path(source)
            self._ensure_parent(target)
            os.replace(source, target)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return False
            _raise_os_error(exc, str(target.relative_to(self.root)))
        if self.fsync and sync_name:
            fsync_dir(target.parent)
        return True

    def place_blocking(self, key: str, source: Path | Bytes | Sequence[Bytes]) -> bool:
        """Move the file, or write the bytes, into place under ``key`` without flushing: durable
        once ``sync_blocking`` has returned (the group commit flushes a whole batch at once)."""
        if isinstance(source, Path):
            return self._move(source, self.path_of(key), sync_name=False, flush=False)
        self._write_new(key, source)
        return True

    def _write_new(self, key: str, data: Bytes | Sequence[Bytes]) -> None:
        """Write ``data`` under a temporary name and rename it into place (unflushed).

        On the hot path of ingest: plain string paths, as ``pathlib`` costs more than the writing.
        """
        target = os.path.join(self._root_name, check_key(key))
        folder = os.path.dirname(target)
        temp = os.path.join(self._tmp_name, f"{self._temp_names.next()}.part")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data))
                if self.fsync and _start_writeback is not None:
                    # Start writing the pages out now; the batch's flush then mostly waits for
                    # writes already under way instead of issuing them all at once.
                    _start_writeback(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
            finally:
                os.close(fd)
            if folder not in self._known_folder_names:
                self._ensure_parent(Path(target))
                self._known_folder_names.add(folder)
            os.replace(temp, target)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            _raise_os_error(exc, key)

    async def put_staged(self, key: str, source: Path) -> None:
        target = self.path_of(key)
        if not await asyncio.to_thread(self._move, source, target, False):
            await self.put_file(key, source, move=True)

    def sync_blocking(self, keys: Sequence[str]) -> None:
        """Make a batch of placed files durable: their bytes and their names.

        One ``syncfs`` of the storage's file system for the whole batch where the platform has it
        (one journal commit instead of one flush per file and per folder); otherwise each file and
        each folder is flushed.
        """
        if not self.fsync or not keys:
            return
        try:
            if _syncfs is not None:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    if _syncfs(fd) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, os.strerror(code))
                finally:
                    os.close(fd)
                return
            paths = [self.path_of(key) for key in keys]
            for path in paths:
                _fsync_path(path)
            for folder in sorted({path.parent for path in paths}):
                fsync_dir(folder)
        except OSError as exc:
            _raise_os_error(exc, "flushing stored files")

    def _put_bytes(self, key: str, data: bytes) -> None:
        target = self.path_of(key)
        temp = self.tmp / f"{self._temp_names.next()}.part"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            self._commit(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            _raise_os_error(exc, key)

    async def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        check_key(key)
        await asyncio.to_thread(self._put_file, key, source, move)

    async def put_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        await asyncio.to_thread(self._put_bytes, key, data)

    async def get_bytes(self, key: str) -> bytes:
        path = self.path_of(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise StorageError("object not found", key) from None
        except OSError as exc:
            raise StorageError("storage read failed", f"{key}: {exc}") from exc

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:  # type: ignore[override]
        path = self.path_of(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise StorageError("object not found", key) from None
        try:
            while chunk := await asyncio.to_thread(f.read, chunk_size):
                yield chunk
        finally:
            f.close()

    def _fetch(self, key: str, dest: Path) -> None:
        source = self.path_of(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except FileExistsError:
            pass
        except OSError:
            shutil.copyfile(source, dest)

    async def fetch(self, key: str, dest: Path) -> None:
        try:
            await asyncio.to_thread(self._fetch, key, dest)
        except FileNotFoundError:
            raise StorageError("object not found", key) from None
        except OSError as exc:
            raise StorageError("storage read failed", f"{key}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_of(key).is_file)

    async def size(self, key: str) -> int:
        try:
            return (await asyncio.to_thread(self.path_of(key).stat)).st_size
        except FileNotFoundError:
            raise StorageError("object not found", key) from None

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path_of(key).unlink, True)

    async def list(self, prefix: str) -> list[str]:
        base = self.path_of(prefix.rstrip("/"))

        def walk() -> list[str]:
            if base.is_file():
                return [prefix.rstrip("/")]
            out = []
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    out.append(str(Path(dirpath, name).relative_to(self.root)))
            return sorted(out)

        return await asyncio.to_thread(walk)

    async def usage(self) -> StorageUsage:
        st = await asyncio.to_thread(os.statvfs, self.root)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return StorageUsage(used_bytes=total - st.f_bfree * st.f_frsize, free_bytes=free, total_bytes=total)

    def describe(self) -> Mapping[str, Any]:
        return {"kind": self.kind, "path": str(self.root), "fsync": self.fsync}
