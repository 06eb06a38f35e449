"""The published OpenAPI description of the HTTP API (``GET /v1/openapi.json``)."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from . import __version__


@cache
def openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(files("mwm").joinpath("openapi.json").read_text(encoding="utf-8"))
    document.setdefault("info", {})["version"] = __version__
    return document
