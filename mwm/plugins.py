"""Plugin resolution by name through entry points (``mwm.engines``, ``mwm.storage``, ``mwm.sinks``).

Built-in kinds register exactly as a third party's would, in ``setup.cfg``. Listing plugins
imports none of them; loading an unknown one raises an error that names the installed ones.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PluginError

ENGINES = "mwm.engines"
STORAGE = "mwm.storage"
SINKS = "mwm.sinks"
_LABELS = {ENGINES: "engine", STORAGE: "storage kind", SINKS: "sink kind"}


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """Names of the installed plugins of a group, without importing them."""
    return sorted(_entry_points(group))


@cache
def load(group: str, name: str) -> Any:
    """The plugin class registered under ``name`` in ``group``."""
    found = _entry_points(group)
    label = _LABELS.get(group, group)
    if name not in found:
        installed = ", ".join(sorted(found)) or "none"
        raise PluginError(f"unknown {label} {name!r} (installed: {installed})")
    try:
        return found[name].load()
    except Exception as exc:
        raise PluginError(f"cannot load {label} {name!r}", f"{type(exc).__name__}: {exc}") from exc
