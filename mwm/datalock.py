"""One mwm per data folder: an exclusive lock held for as long as the service runs.

Two servers on one data folder would each take the other's running jobs for orphans of a crash
and stop them, purge each other's half-received files and interleave their commits; the second
one to start refuses instead, naming the process that holds the folder. The lock is the kernel's
(``flock``), so a server that crashed holds nothing: the next start takes the folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import MwmError

LOCK_NAME = "mwm.lock"


class DataFolderInUse(MwmError):
    """Another mwm holds the data folder (or the database)."""

    code = "data_folder_in_use"
    http_status = 409


class FolderLock:
    """Exclusive locks on lock files, taken together and released together."""

    def __init__(self, locks: list[tuple[Path, str]]) -> None:
        """``locks``: each lock file, and what it keeps for one mwm ("the data folder X")."""
        self.locks = locks
        self._fds: list[int] = []

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.locks]

    @classmethod
    def for_data(cls, data_dir: Path, database_path: Path) -> FolderLock:
        """The data folder's lock and the database's: another server given either (its data
        folder elsewhere but this database, say) is refused."""
        return cls(
            [
                (data_dir / LOCK_NAME, f"the data folder {data_dir}"),
                (database_path.with_name(database_path.name + ".lock"), f"the database {database_path}"),
            ]
        )

    def acquire(self) -> None:
        """Take every lock, or none: raise ``DataFolderInUse`` naming the holder's process."""
        try:
            for path, what in self.locks:
                self._fds.append(self._take(path, what))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _take(path: Path, what: str) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataFolderInUse(
                f"{what} is in use by another mwm" + (f" (process {holder})" if holder.isdigit() else ""),
                f"only one mwm may use a data folder and its database; {path} is locked",
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    def release(self) -> None:
        """Let go (the files stay: removing one could race with the next server taking it)."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop())
