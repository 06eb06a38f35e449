"""Fixtures for the tests of ``samples/``: the synthetic study generator and the ct_sample application."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES_DIR = REPO_ROOT / "samples"
CT_SAMPLE_DIR = SAMPLES_DIR / "apps" / "ct_sample"
CT_SAMPLE_APP = CT_SAMPLE_DIR / "app.py"

if str(SAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(SAMPLES_DIR))


def _load_app_module() -> ModuleType:
    """Import ``samples/apps/ct_sample/app.py`` under a name that cannot clash with other modules."""
    name = "ct_sample_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CT_SAMPLE_APP)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ct_app() -> ModuleType:
    """The ct_sample application module, imported in-process."""
    return _load_app_module()
