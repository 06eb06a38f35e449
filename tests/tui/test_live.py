"""The console against a real mwm: live updates, actions with confirmation, tokens, reconnection."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import synthetic
from support import base_config, upload_files, url_of, wait_job_state, wait_jobs
from textual.widgets import Log
from tui_support import until

from mwm.tui.app import MwmApp
from mwm.tui.jobs import JobsPane
from mwm.tui.overview import OverviewPane
from mwm.tui.widgets import Banner, ConfirmScreen, KeyedTable

WRITE_RESULT = (
    "import os; print('working'); open(os.path.join(os.environ['HOLOSCAN_OUTPUT_PATH'], 'out.txt'), 'w').write('done')"
)
SLEEP = "import time; print('sleeping', flush=True); time.sleep(30)"
READ_TOKEN = "read-only-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
#: No polling: what changes on screen can only have come through the event stream.
STREAM_ONLY = {"poll_interval": 60.0, "live_interval": 60.0, "slow_interval": 600.0, "debounce": 0.05}


def state_on_screen(app: MwmApp, job_id: int) -> str | None:
    cells = app.query_one("#job-table", KeyedTable).cells_of(str(job_id))
    return cells[1].text.plain if cells else None


def footer_keys(app: MwmApp) -> set[str]:
    """The descriptions of the key bindings the footer shows where the focus is."""
    return {b.binding.description for b in app.screen.active_bindings.values() if b.binding.show}


def study(tmp_path: Path, seed: int, instances: int = 2) -> synthetic.StudyInfo:
    return synthetic.generate_study(
        tmp_path / f"study-{seed}", series_count=1, instances_per_series=instances, rows=16, cols=16, seed=seed
    )


async def test_a_study_goes_from_bucket_to_succeeded_job_on_screen_by_itself(
    tmp_path: Path, make_service: Any, client_for: Any
) -> None:
    config = base_config(
        tmp_path,
        apps=[
            {
                "id": "quick",
                "command": [sys.executable, "-c", WRITE_RESULT],
                "arguments": False,
                "timeout": "1s",
                "sinks": ["out"],
            }
        ],
        sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out")}],
    )
    service = await make_service(config)
    client = await client_for(service)
    app = MwmApp(url_of(service), feed_options=STREAM_ONLY)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.link.state == "live" and app.store.jobs is not None, what="the stream")
        buckets = app.query_one(OverviewPane).query_one("#bucket-table", KeyedTable)
        assert buckets.row_count == 0
        await upload_files(client, study(tmp_path, 1).paths)
        await until(pilot, lambda: buckets.row_count == 1, what="the open bucket on the overview")
        assert buckets.cells_of("1") is not None
        countdown = buckets.cells_of("1")[-1].text.plain  # type: ignore[index]
        assert countdown in ("00:01", "due"), countdown
        seen: list[str] = []

        def succeeded() -> bool:
            state = state_on_screen(app, 1)
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            return state == "succeeded"

        await until(pilot, succeeded, what="job 1 succeeded on the jobs table")
        await until(pilot, lambda: buckets.row_count == 0, what="the bucket gone from the overview")
        await until(
            pilot,
            lambda: (app.store.stats or {}).get("deliveries", {}).get("out") == {"delivered": 1},
            what="the delivery counted",
        )
        assert app.feed.last_event_id is not None
        print(f"job states seen on screen: {seen}")


async def test_cancel_then_retry_a_job_with_confirmation(tmp_path: Path, make_service: Any, client_for: Any) -> None:
    config = base_config(
        tmp_path,
        apps=[{"id": "slow", "command": [sys.executable, "-c", SLEEP], "arguments": False, "timeout": "200ms"}],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, study(tmp_path, 2).paths)
    await wait_jobs(client, 1, ["running"], timeout=20)
    app = MwmApp(url_of(service), feed_options={"debounce": 0.05})
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: state_on_screen(app, 1) == "running", what="job 1 running on screen")
        pane = app.query_one(JobsPane)
        pane.select_job(1)
        await until(pilot, lambda: "Cancel" in footer_keys(app), what="the cancel action")
        await pilot.press("l")  # the log of the running job, followed
        log = app.query_one("#log", Log)
        await until(pilot, lambda: any("sleeping" in line for line in log.lines), what="the running job's log")
        await pilot.press("i")

        await pilot.press("x")  # asked, and declined: nothing changes
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("n")
        await pilot.pause(0.3)
        assert (await client.get("/v1/jobs/1"))["state"] == "running"

        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        await wait_job_state(client, 1, ["cancelled"], timeout=10)
        await until(pilot, lambda: state_on_screen(app, 1) == "cancelled", what="cancelled on screen")
        await until(
            pilot,
            lambda: "Retry" in footer_keys(app) and pane.check_action("retry_job", ()) is True,
            what="the retry action",
        )

        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.click("#yes")
        await wait_job_state(client, 1, ["scheduled", "launching", "running"], timeout=10)
        await until(
            pilot,
            lambda: state_on_screen(app, 1) in ("scheduled", "launching", "running"),
            what="the retried job on screen",
        )
        await client.post("/v1/jobs/1/cancel")


async def test_a_read_only_token_sees_no_actions(tmp_path: Path, make_service: Any, client_for: Any) -> None:
    config = base_config(
        tmp_path,
        server={"tokens": [{"token": READ_TOKEN, "role": "read"}, {"token": ADMIN_TOKEN, "role": "admin"}]},
        apps=[
            {"id": "hold", "command": ["true"], "arguments": False, "timeout": "1h"},
            {"id": "broken", "command": ["false"], "arguments": False, "timeout": "100ms", "max_attempts": 1},
        ],
    )
    service = await make_service(config)
    client = await client_for(service, ADMIN_TOKEN)
    await upload_files(client, study(tmp_path, 3).paths)
    await wait_jobs(client, 1, ["failed"], timeout=20)

    reader = MwmApp(url_of(service), READ_TOKEN, feed_options={"debounce": 0.05})
    async with reader.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: reader.role == "read" and reader.store.buckets, what="the role and the data")
        await pilot.pause(0.3)
        assert reader.query_one(OverviewPane).check_action("close_bucket", ()) is False
        assert "Close bucket" not in footer_keys(reader) and "Quit" in footer_keys(reader)
        await pilot.press("c")
        await pilot.pause(0.2)
        assert not isinstance(reader.screen, ConfirmScreen)
        await pilot.press("2")
        await until(pilot, lambda: state_on_screen(reader, 1) == "failed", what="the failed job")
        reader.query_one(JobsPane).select_job(1)
        await pilot.pause(0.2)
        assert not footer_keys(reader) & {"Cancel", "Retry", "Retry delivery", "Close bucket"}
        await pilot.press("r")
        await pilot.pause(0.2)
        assert not isinstance(reader.screen, ConfirmScreen)
        assert "read-only" in str(reader.query_one("#top").render())
    assert (await client.get("/v1/jobs/1"))["state"] == "failed"

    admin = MwmApp(url_of(service), ADMIN_TOKEN, feed_options={"debounce": 0.05})
    async with admin.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: admin.role == "admin" and admin.store.buckets, what="the role and the data")
        await until(pilot, lambda: "Close bucket" in footer_keys(admin), what="the close action")
        await pilot.press("2")
        await until(pilot, lambda: state_on_screen(admin, 1) == "failed", what="the failed job")
        admin.query_one(JobsPane).select_job(1)
        await until(pilot, lambda: "Retry" in footer_keys(admin), what="the retry action")


async def test_the_console_reconnects_after_mwm_restarts(tmp_path: Path, make_service: Any, client_for: Any) -> None:
    config = base_config(tmp_path, apps=[{"id": "hold", "command": ["true"], "arguments": False, "timeout": "1h"}])
    first = await make_service(config)
    port = first.http_port
    app = MwmApp(url_of(first), feed_options={"debounce": 0.05, "max_backoff": 1.0})
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.link.state == "live", what="the stream")
        await first.stop()
        banner = app.query_one(Banner)
        await until(pilot, lambda: app.link.state == "down" and banner.has_class("-shown"), what="the banner")
        assert "unreachable" in str(banner.render())

        config["server"] = {**config["server"], "http": f"127.0.0.1:{port}"}
        second = await make_service(config)
        await until(
            pilot,
            lambda: app.link.state == "live" and not banner.has_class("-shown"),
            timeout=20,
            what="the console to reconnect",
        )
        client = await client_for(second)
        await upload_files(client, study(tmp_path, 4).paths)
        buckets = app.query_one(OverviewPane).query_one("#bucket-table", KeyedTable)
        await until(pilot, lambda: buckets.row_count == 1, what="news from the restarted mwm")


async def test_without_the_event_stream_the_console_polls(tmp_path: Path, make_service: Any, client_for: Any) -> None:
    config = base_config(tmp_path, apps=[{"id": "hold", "command": ["true"], "arguments": False, "timeout": "1h"}])
    service = await make_service(config)
    client = await client_for(service)
    app = MwmApp(url_of(service), feed_options={"stream_path": "/v1/no-such-stream", "debounce": 0.05})
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.link.state == "polling" and app.store.buckets is not None, what="polling")
        await upload_files(client, study(tmp_path, 5).paths)
        buckets = app.query_one(OverviewPane).query_one("#bucket-table", KeyedTable)
        await until(pilot, lambda: buckets.row_count == 1, timeout=10, what="the bucket, polled")
        assert app.link.state == "polling"
        assert "polling" in str(app.query_one("#top").render())
