"""The console never shows the token, survives whatever the client raises, and needs a terminal."""

from __future__ import annotations

import asyncio
import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from rich.console import Console, RenderableType
from rich.traceback import Traceback
from support import base_config, url_of
from tui_support import until
from yarl import URL

from mwm.client import Client, ClientError
from mwm.tui import app as app_module
from mwm.tui.app import EXIT_NOT_A_TERMINAL, NEEDS_TERMINAL, MwmApp, run_tui
from mwm.tui.crash import crash_report, safe_renderable
from mwm.tui.data import Feed, Unreachable, describe_error, redact
from mwm.tui.widgets import Banner

TOKEN = "SECRETTOKEN1234567890"
#: A local variable's value that the source does not spell out: seen only if locals are printed.
LOCAL_PARTS = ("local", "value", "7f3a")
LOCAL_VALUE = "-".join(LOCAL_PARTS)
FAST_RETRIES: dict[str, Any] = {"debounce": 0.0, "backoff_base": 0.05, "max_backoff": 0.2}


def leak() -> None:
    """Fail as a careless library would: the token in a local variable and in the message."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    marker = "-".join(LOCAL_PARTS)
    raise RuntimeError(f"the request failed with headers {headers} ({len(marker)})")


class LeakyClient(Client):
    """Every request fails with an exception no one expected, carrying the token."""

    requests = 0

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        LeakyClient.requests += 1
        headers = {"Authorization": f"Bearer {self.token}"}
        raise RuntimeError(f"the request failed with headers {headers} (token {self.token})")


def screen_text(app: MwmApp) -> str:
    """Everything drawn: the screenshot (SVG), the banner, the top bar and the notifications."""
    notes = " ".join(str(n.message) + " " + str(n.title) for n in app._notifications)
    drawn = [str(app.query_one(Banner).render()), str(app.main_screen.query_one("#top").render())]
    return app.export_screenshot() + " ".join(drawn) + notes


# -- errors of the client: the banner, and the console goes on --------------------------------


async def test_an_unexpected_client_error_shows_the_banner_without_the_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    LeakyClient.requests = 0
    app = MwmApp("http://127.0.0.1:9", TOKEN, client_factory=LeakyClient, feed_options=FAST_RETRIES)
    async with app.run_test(size=(120, 30)) as pilot:
        banner = app.query_one(Banner)
        await until(pilot, lambda: app.link.state == "down" and banner.has_class("-shown"), what="the banner")
        requests = LeakyClient.requests
        await until(pilot, lambda: LeakyClient.requests > requests, what="a retry after the back-off")
        shown = str(banner.render())
        assert "unreachable" in shown and "retrying" in shown
        assert "RuntimeError: the request failed with headers {'Authorization': 'Bearer ***'}" in shown
        assert "\n" not in shown
        assert TOKEN not in screen_text(app)
        assert app.link.error is not None and TOKEN not in app.link.error

        # An action goes through the same client: refused as "unreachable", token blanked.
        with pytest.raises(Unreachable) as refused:
            await app.feed.post("/v1/jobs/1/cancel")
        assert TOKEN not in refused.value.message and "***" in refused.value.message

        await pilot.press("f5")  # reconnecting at once fails the same way, and nothing more
        await pilot.pause(0.3)
        assert app.is_running and app.return_code is None
        assert TOKEN not in screen_text(app)
    # run_test re-raises what stopped the app: it stopped because the test was over.
    out, err = capsys.readouterr()
    assert TOKEN not in out + err


async def test_an_address_without_scheme_does_not_stop_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    """``--url 127.0.0.1:PORT``: aiohttp refused it with an error the client did not translate."""
    app = MwmApp("127.0.0.1:9", TOKEN, feed_options=FAST_RETRIES)
    async with app.run_test(size=(120, 30)) as pilot:
        banner = app.query_one(Banner)
        await until(pilot, lambda: app.link.state == "down" and banner.has_class("-shown"), what="the banner")
        await pilot.pause(0.5)
        assert app.is_running and app.return_code is None
        assert "unreachable" in str(banner.render())
        assert TOKEN not in screen_text(app)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err


async def test_a_client_that_cannot_be_made_is_retried_until_it_can(
    tmp_path: Path, make_service: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = base_config(
        tmp_path,
        server={"tokens": [{"token": TOKEN, "role": "admin"}]},
        apps=[{"id": "hold", "command": ["true"], "arguments": False, "timeout": "1h"}],
    )
    service = await make_service(config)
    attempts: list[str] = []

    def factory(url: str, token: str | None) -> Client:
        attempts.append(url)
        if len(attempts) < 3:
            secret = token
            raise OSError(f"cannot read the CA file for {secret}")
        return Client(url, token)

    app = MwmApp(url_of(service), TOKEN, client_factory=factory, feed_options=FAST_RETRIES)
    async with app.run_test(size=(120, 30)) as pilot:
        banner = app.query_one(Banner)
        await until(pilot, lambda: app.link.state == "down" and banner.has_class("-shown"), what="the banner")
        assert "OSError: cannot read the CA file for ***" in str(banner.render())
        assert TOKEN not in screen_text(app)
        await until(pilot, lambda: app.link.state == "live" and app.store.apps is not None, what="the connection")
        assert not banner.has_class("-shown")
        assert len(attempts) == 3
    out, err = capsys.readouterr()
    assert TOKEN not in out + err


async def test_a_malformed_answer_is_reported_like_an_unreachable_mwm() -> None:
    class OddClient(Client):
        async def request(self, method: str, path: str, **kwargs: Any) -> Any:
            return {"unexpected": True}  # no "buckets", "jobs", … in it

    app = MwmApp("http://127.0.0.1:9", TOKEN, client_factory=OddClient, feed_options=FAST_RETRIES)
    async with app.run_test(size=(120, 30)) as pilot:
        banner = app.query_one(Banner)
        await until(pilot, lambda: app.link.state == "down" and banner.has_class("-shown"), what="the banner")
        assert "unexpected answer to " in str(banner.render())
        await pilot.pause(0.3)
        assert app.is_running and app.return_code is None


# -- errors of the console itself: it stops, and prints no local variables ---------------------


class RichError(Exception):
    """An exception that renders itself (Textual prints such by their own ``__rich__``)."""

    def __rich__(self) -> RenderableType:
        return Traceback.from_exception(type(self), self, self.__traceback__, show_locals=True)


class CrashingApp(MwmApp):
    """The console with a bug behind F5."""

    error: type[Exception] = RuntimeError

    def action_reconnect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        marker = "-".join(LOCAL_PARTS)
        raise self.error(f"refused: {headers} token={self.token} ({len(marker)})")


@pytest.mark.parametrize("error", [RuntimeError, RichError])
async def test_an_unexpected_error_stops_the_console_without_showing_locals_or_token(
    error: type[Exception], capsys: pytest.CaptureFixture[str]
) -> None:
    app = CrashingApp("http://127.0.0.1:9", TOKEN, client_factory=LeakyClient, feed_options=FAST_RETRIES)
    app.error = error
    with pytest.raises(error):  # Textual re-raises it to the test, as to any test framework
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.press("f5")
            await pilot.pause(0.2)
    assert app.return_code == 1
    out, err = capsys.readouterr()
    printed = out + err
    assert "Traceback" in printed and "action_reconnect" in printed  # the report is printed …
    assert f"{error.__name__}: refused: {{'Authorization': 'Bearer ***'}} token=*** ({len(LOCAL_VALUE)})" in printed
    assert TOKEN not in printed  # … without the token
    assert LOCAL_VALUE not in printed  # … nor the local variables


def test_a_crash_report_has_no_locals_and_no_secret() -> None:
    try:
        leak()
    except RuntimeError as exc:
        error = exc
    console_file = io.StringIO()
    console = Console(file=console_file, width=100, color_system=None)
    console.print(crash_report(error, [TOKEN]))
    shown = console_file.getvalue()
    assert "in leak" in shown and "RuntimeError" in shown
    assert TOKEN not in shown and "Bearer ***" in shown
    assert LOCAL_VALUE not in shown

    with_locals = Traceback.from_exception(type(error), error, error.__traceback__, show_locals=True)
    console.print(safe_renderable(with_locals, [TOKEN]))
    assert TOKEN not in console_file.getvalue()
    assert LOCAL_VALUE not in console_file.getvalue()
    assert safe_renderable("plain text", [TOKEN]) == "plain text"


# -- one line about any failure, secrets blanked ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"token {TOKEN} refused", "token *** refused"),
        ("Authorization: Bearer other-token.xyz", "Authorization: Bearer ***"),
        ("{'Authorization': 'bearer abc123'}", "{'Authorization': 'bearer ***'}"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text, [TOKEN, None, ""]) == expected


def test_describe_error() -> None:
    assert describe_error(aiohttp.NonHttpUrlClientError(URL("127.0.0.1:8080/v1/stats"))) == (
        "the address must start with http:// or https://"
    )
    assert describe_error(RuntimeError(f"first line {TOKEN}\nsecond line"), [TOKEN]) == "RuntimeError: first line ***"
    assert describe_error(KeyError("buckets")) == "KeyError: 'buckets'"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert (
        describe_error(ClientError("cannot reach mwm", "connection refused")) == "cannot reach mwm: connection refused"
    )
    group = ExceptionGroup("loops", [ValueError(f"bad {TOKEN}"), KeyError("x")])
    assert describe_error(group, [TOKEN]) == "ValueError: bad ***"
    assert len(describe_error(RuntimeError("x" * 500))) == 100


async def test_the_feed_reports_any_client_failure_as_unreachable() -> None:
    class Listener:
        def __init__(self) -> None:
            self.links: list[Any] = []

        def feed_update(self, update: Any) -> None: ...

        def feed_link(self, status: Any) -> None:
            self.links.append(status)

        def feed_event(self, event: dict[str, Any]) -> None: ...

        def feed_role(self, role: Any) -> None: ...

    listener = Listener()
    feed = Feed("http://127.0.0.1:9", TOKEN, listener, client_factory=LeakyClient, **FAST_RETRIES)
    task = asyncio.create_task(feed.run())
    try:
        deadline = time.monotonic() + 10
        while not any(s.state == "down" for s in listener.links):
            assert time.monotonic() < deadline, "the feed reported no failure"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert not task.done()  # still trying
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    down = [s for s in listener.links if s.state == "down"]
    assert all(TOKEN not in (s.error or "") for s in down)


# -- a terminal, or nothing -------------------------------------------------------------------


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("redirected", ["stdin", "stdout", "stderr"])
def test_mwm_tui_refuses_to_start_without_a_terminal(redirected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(self: MwmApp, **kwargs: Any) -> None:
        raise AssertionError("the console started")

    monkeypatch.setattr(app_module.MwmApp, "run", run)
    streams = {name: Stream(name != redirected) for name in ("stdin", "stdout", "stderr")}
    status = run_tui(url="http://127.0.0.1:9", token=TOKEN, **streams)  # type: ignore[arg-type]
    assert status == EXIT_NOT_A_TERMINAL == 2
    assert streams["stderr"].getvalue() == NEEDS_TERMINAL + "\n"
    assert streams["stdout"].getvalue() == ""


def test_mwm_tui_starts_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[MwmApp] = []

    def run(self: MwmApp, **kwargs: Any) -> None:
        started.append(self)

    monkeypatch.setattr(app_module.MwmApp, "run", run)
    streams = {name: Stream(True) for name in ("stdin", "stdout", "stderr")}
    assert run_tui(url="http://127.0.0.1:9", token=TOKEN, cafile="/etc/mwm/ca.pem", **streams) == 0  # type: ignore[arg-type]
    assert len(started) == 1 and started[0].token == TOKEN
    assert streams["stderr"].getvalue() == ""
    # --cacert reaches the console's client: an HTTPS mwm with its own CA can be watched.
    assert started[0].client_factory("https://127.0.0.1:9", TOKEN).cafile == "/etc/mwm/ca.pem"


def test_a_closed_or_odd_stream_is_no_terminal() -> None:
    closed = io.StringIO()
    closed.close()
    assert not app_module.is_terminal(closed)
    assert not app_module.is_terminal(None)
    assert not app_module.is_terminal(object())


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_mwm_tui_with_stdout_in_a_file_says_so_and_exits_2(tmp_path: Path) -> None:
    """The real command, in a terminal but with its output redirected: ``mwm tui > file``."""
    leader, follower = os.openpty()
    out = tmp_path / "out.txt"
    try:
        with out.open("wb") as stdout:
            process = subprocess.run(
                [sys.executable, "-m", "mwm", "tui", "--url", "http://127.0.0.1:9", "--token", TOKEN],
                stdin=follower,
                stdout=stdout,
                stderr=follower,
                timeout=60,
                check=False,
            )
        said = b""
        while select.select([leader], [], [], 0.5)[0]:
            chunk = os.read(leader, 4096)
            if not chunk:
                break
            said += chunk
    finally:
        os.close(follower)
        os.close(leader)
    assert process.returncode == 2
    assert out.read_bytes() == b""
    assert said.decode().strip() == NEEDS_TERMINAL
