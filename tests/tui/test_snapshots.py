"""SVG snapshots of the console watching a real mwm (the scene in conftest), time frozen.

Update them with ``pytest tests/tui --snapshot-update`` after a deliberate change of the screens,
and look at the report (``snapshot_report.html``) before committing them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from tui_support import DISPLAY_URL, Scene, data_loaded, frozen_clock, until

from mwm.tui.app import MwmApp
from mwm.tui.apps import AppsPane
from mwm.tui.jobs import JobsPane
from mwm.tui.sinks import SinksPane

SMALL = (80, 24)
LARGE = (180, 50)


def loaded(app: MwmApp) -> bool:
    return data_loaded(app) and app.link.state == "live"


async def settle(pilot: Any) -> None:
    app: MwmApp = pilot.app
    await until(pilot, lambda: loaded(app), what="data and the event stream")
    await pilot.pause(0.2)


async def show_job(pilot: Any, job_id: int) -> None:
    app: MwmApp = pilot.app
    await settle(pilot)
    await pilot.press("2")
    pane = app.query_one(JobsPane)
    pane.select_job(job_id)
    await until(
        pilot,
        lambda: app.store.job is not None and app.store.job.get("id") == job_id and app.store.log is not None,
        what=f"job {job_id}'s details",
    )
    await pilot.pause(0.2)


def test_overview(snap_compare: Any, scene: Scene) -> None:
    """Ingest, today's totals, jobs by state, deliveries, storage, DICOM off, two open buckets."""
    assert snap_compare(scene.app(), terminal_size=SMALL, run_before=settle)


def test_jobs_with_selected_job(snap_compare: Any, scene: Scene) -> None:
    """The jobs table (newest first) and the succeeded job 1's summary with its three deliveries."""

    async def run_before(pilot: Any) -> None:
        await show_job(pilot, 1)

    assert snap_compare(scene.app(), terminal_size=SMALL, run_before=run_before)


def test_failed_job_results(snap_compare: Any, scene: Scene) -> None:
    """Job 1's results tab: one result, delivered to one sink, failed at another, waiting at a third."""

    async def run_before(pilot: Any) -> None:
        await show_job(pilot, 1)
        await pilot.press("o")

    assert snap_compare(scene.app(), terminal_size=SMALL, run_before=run_before)


def test_confirmation(snap_compare: Any, scene: Scene) -> None:
    """Retrying the failed job 3 asks first; "No" has the focus."""

    async def run_before(pilot: Any) -> None:
        await show_job(pilot, 3)
        await pilot.press("r")
        await pilot.pause(0.2)

    assert snap_compare(scene.app(), terminal_size=SMALL, run_before=run_before)


def test_applications(snap_compare: Any, scene: Scene) -> None:
    """Registered applications with 24 h counts; the failing ``triage`` app's rules and last error."""

    async def run_before(pilot: Any) -> None:
        await settle(pilot)
        await pilot.press("3")
        table = pilot.app.query_one(AppsPane).query_one("#app-table")
        table.move_to("triage")
        await pilot.pause(0.1)

    assert snap_compare(scene.app(), terminal_size=SMALL, run_before=run_before)


def test_sinks(snap_compare: Any, scene: Scene) -> None:
    """Sinks with delivery counts; the ``broken`` sink's settings and its failed deliveries."""

    async def run_before(pilot: Any) -> None:
        await settle(pilot)
        await pilot.press("4")
        pilot.app.query_one(SinksPane).query_one("#sink-table").move_to("broken")
        await pilot.pause(0.1)

    assert snap_compare(scene.app(), terminal_size=SMALL, run_before=run_before)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (bound, never listening, so nobody else takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_unreachable_banner(snap_compare: Any, closed_port: int) -> None:
    """Nothing answers: the banner says so and counts down to the next attempt."""
    # A long first back-off, so that no second attempt changes the banner before the screenshot.
    app = MwmApp(
        f"http://127.0.0.1:{closed_port}",
        display_url=DISPLAY_URL,
        clock=frozen_clock(1_700_000_000.0),
        feed_options={"backoff_base": 30.0, "max_backoff": 30.0},
    )

    async def run_before(pilot: Any) -> None:
        await until(pilot, lambda: app.link.state == "down", what="the first failed attempt")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_light_theme_small(snap_compare: Any, scene: Scene) -> None:
    """The overview in the light theme at 80x24."""
    assert snap_compare(scene.app(theme="light"), terminal_size=SMALL, run_before=settle)


def test_light_theme_large(snap_compare: Any, scene: Scene) -> None:
    """A large terminal: the jobs table and the failed job's details side by side, light theme."""

    async def run_before(pilot: Any) -> None:
        await show_job(pilot, 3)

    assert snap_compare(scene.app(theme="light"), terminal_size=LARGE, run_before=run_before)


def test_dark_theme_large_overview(snap_compare: Any, scene: Scene) -> None:
    """The overview in a large terminal."""
    assert snap_compare(scene.app(), terminal_size=LARGE, run_before=settle)
