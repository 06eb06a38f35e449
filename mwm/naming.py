"""Names unique to one run of mwm, for files on hot paths (a UUID each costs more than the write)."""

from __future__ import annotations

import itertools
import secrets


class UniqueNames:
    """``<random prefix drawn at creation>-<counter>``: unique while the prefix is, which is enough
    for a folder emptied at every start, and distinct across runs for names that are kept."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._numbers = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._numbers):x}"
