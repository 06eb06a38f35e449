"""Local-filesystem storage: write to a temporary name, flush, rename."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StorageError, StorageFull
from . import Storage, StorageUsage, check_key


@dataclass(frozen=True)
class LocalOptions:
    path: Path | None = None  # default: <data_dir>/storage
    fsync: bool = True


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

    def __init__(self, options: LocalOptions, *, data_dir: Path) -> None:
        super().__init__(options, data_dir=data_dir)
        self.root = (options.path or data_dir / "storage").absolute()
        self.tmp = self.root / ".tmp"
        self.fsync = options.fsync
        self._known_dirs: set[Path] = set()

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
        temp = self.tmp / f"{uuid.uuid4().hex}.part"
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

    def _move(self, source: Path, target: Path, sync_name: bool = True) -> bool:
        """Rename a file already on this file system into place (flushed first); False if it is not."""
        try:
            if self.fsync:
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

    def place_blocking(self, key: str, source: Path) -> bool:
        return self._move(source, self.path_of(key), False)

    async def put_staged(self, key: str, source: Path) -> None:
        target = self.path_of(key)
        if not await asyncio.to_thread(self._move, source, target, False):
            await self.put_file(key, source, move=True)

    async def sync(self, keys: Sequence[str]) -> None:
        """One directory flush per folder for a whole batch of ``put_staged`` files."""
        if not self.fsync or not keys:
            return
        folders = sorted({self.path_of(key).parent for key in keys})

        def flush() -> None:
            for folder in folders:
                fsync_dir(folder)

        try:
            await asyncio.to_thread(flush)
        except OSError as exc:
            _raise_os_error(exc, "flushing folders")

    def _put_bytes(self, key: str, data: bytes) -> None:
        target = self.path_of(key)
        temp = self.tmp / f"{uuid.uuid4().hex}.part"
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
