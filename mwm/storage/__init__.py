"""The ``Storage`` contract: where mwm keeps the bytes of instances, results and logs.

Kinds are plugins resolved by name through the ``mwm.storage`` entry points (``local``, ``s3``).
Keys are ``/``-separated relative names built by mwm from validated parts (``key``); a kind never
sees text from outside as a name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import StorageError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_KEY_LENGTH = 1024


def check_key(key: str) -> str:
    """Return ``key`` if every segment is a safe name, else raise ``StorageError``."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise StorageError("invalid storage key", repr(key[:80]))
    for segment in key.split("/"):
        if not _SEGMENT.match(segment) or segment in (".", ".."):
            raise StorageError("invalid storage key", repr(key[:80]))
    return key


def key(*parts: str) -> str:
    """Join validated parts into a key."""
    return check_key("/".join(parts))


@dataclass(frozen=True)
class StorageUsage:
    """Space where the bytes live; ``None`` fields are unknown (e.g. object storage)."""

    used_bytes: int | None
    free_bytes: int | None
    total_bytes: int | None


class Storage(ABC):
    """Durable, atomic storage of whole files under keys.

    Contract:
    - ``put_file`` and ``put_bytes`` return only once the object is durable; a reader never sees a
      partial object under its key, even after a crash.
    - Every method is a coroutine that does not block the event loop.
    - ``local_path`` returns a path on this machine when the kind keeps files locally (so the
      local engine can hard-link instead of copying); other kinds return ``None``.
    """

    kind: ClassVar[str]
    #: True when ``place_blocking`` stores on this machine's disk (cheap enough for the event loop
    #: with small instances); False when it cannot place at all.
    places_files: ClassVar[bool] = False
    #: A frozen dataclass of the kind's options, built with ``mwm.options.build``.
    Options: ClassVar[type[Any]]

    def __init__(self, options: Any, *, data_dir: Path) -> None:
        self.options = options
        self.data_dir = data_dir

    async def open(self) -> None:
        """Check the storage is reachable and writable; raise ``StorageError`` with the reason."""

    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        """Store the local file ``source`` under ``key``; with ``move`` the source may be consumed."""

    async def put_staged(self, key: str, source: Path) -> None:
        """Move a received file into place under ``key``; durable once ``sync_blocking`` has returned.

        Lets a caller that stores many objects at once (ingest's group commit) make their names
        durable together. The default is ``put_file(move=True)``, durable on return.
        """
        await self.put_file(key, source, move=True)

    def place_blocking(
        self, key: str, source: Path | bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
    ) -> bool:
        """``put_staged`` done on the caller's (worker) thread, for kinds that keep files on this
        machine: ``source`` is a received file to move, or the received bytes to write (one buffer,
        or pieces written one after the other). False when the kind cannot (then ``put_staged`` is
        used). Blocking."""
        return False

    def sync_blocking(self, keys: Sequence[str]) -> None:
        """Make the objects stored with ``put_staged`` or ``place_blocking`` under ``keys`` durable
        (default: nothing to do, ``put_staged`` was durable on return). Blocking."""

    @abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``."""

    @abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """The whole object (for small objects such as logs)."""

    @abstractmethod
    def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object in chunks."""

    @abstractmethod
    async def fetch(self, key: str, dest: Path) -> None:
        """Place the object at the local path ``dest`` (a hard link where possible)."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def size(self, key: str) -> int: ...

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a key prefix ending at a segment boundary)."""

    async def usage(self) -> StorageUsage:
        return StorageUsage(None, None, None)

    def local_path(self, key: str) -> Path | None:
        return None

    def describe(self) -> Mapping[str, Any]:
        """What the health endpoint shows about this storage."""
        return {"kind": self.kind}
