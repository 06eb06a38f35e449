"""Fixtures of the console's tests (the helpers are in ``tui_support``)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import synthetic
from tui_support import Scene, ThreadedService, build_scene, scene_config


def pytest_configure(config: pytest.Config) -> None:
    """Write the snapshot report to the temporary folder, not into the working tree."""
    if getattr(config.option, "snapshot_report", None) == "snapshot_report.html":
        config.option.snapshot_report = str(Path(tempfile.gettempdir()) / "mwm-tui-snapshot-report.html")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    root = tmp_path_factory.mktemp("scene")
    studies = [
        synthetic.generate_study(
            root / f"study-{seed}", series_count=1, instances_per_series=2, rows=16, cols=16, seed=seed
        )
        for seed in range(1, 7)
    ]
    service = ThreadedService(scene_config(root)).start()
    try:
        service.call(build_scene(service.url, studies))
        yield Scene(service, root, time.time())
    finally:
        service.stop()
