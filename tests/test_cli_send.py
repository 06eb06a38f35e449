"""``mwm send`` as a user runs it: what it sends, skips and reports, and when it stops."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import synthetic
from aiohttp import web
from rich.console import Console
from rich.progress import Progress
from support import base_config, url_of
from test_cli import free_port, run

from mwm import cli
from mwm.client import Client
from mwm.send import SKIPPED_DICOMDIR, SKIPPED_NOT_PART10, load

READ = "read-token-0123456789"
ADMIN = "admin-token-0123456789"

#: A Part-10 prefix and then nothing mwm can read: sent, and rejected by the service.
BROKEN = bytes(128) + b"DICM" + b"\xff" * 64


def copy_study(study: synthetic.StudyInfo, folder: Path, count: int | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for index, path in enumerate(study.paths[:count]):
        copy = folder / f"IM{index:04d}"
        shutil.copyfile(path, copy)
        copies.append(copy)
    return copies


async def stored_instances(service: Any, token: str | None = None) -> int:
    async with Client(url_of(service), token) as client:
        return len((await client.get("/v1/instances", limit=1000))["instances"])


class FakeMwm:
    """An HTTP server that answers like mwm would in one situation, and counts the requests."""

    def __init__(self, status: int, message: str, *, apps: bool = True) -> None:
        self.status = status
        self.message = message
        self.apps = apps
        self.requests: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests.append(f"{request.method} {request.path}")
        if request.method == "GET" and request.path.startswith("/v1/apps/") and self.apps:
            return web.json_response({"id": request.match_info["tail"]})
        return web.json_response({"error": "x", "message": self.message, "detail": None}, status=self.status)

    @property
    def uploads(self) -> int:
        return sum(1 for r in self.requests if r == "POST /v1/instances")


@pytest.fixture
async def fake_mwm() -> AsyncIterator[Callable[..., Awaitable[tuple[FakeMwm, str]]]]:
    runners: list[web.AppRunner] = []

    async def start(status: int, message: str, *, apps: bool = True) -> tuple[FakeMwm, str]:
        fake = FakeMwm(status, message, apps=apps)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return fake, f"127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


# -- failures that affect every file: one message, and stop ---------------------------------------


async def test_unreachable_mwm_stops_with_one_message(tmp_path, small_study) -> None:
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run("send", str(folder), "--url", url, "--batch", "1")
    assert code == 1
    assert err == f"mwm send: cannot reach mwm at {url}: connection refused\n"
    assert "sent" not in out and "failed" not in out


async def test_a_full_mwm_stops_the_send_with_one_message(tmp_path, small_study, make_service) -> None:
    service = await make_service(base_config(tmp_path))
    service.ingestor.pressure = "data folder 99.9% full (limit 95%)"
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    code, out, err = await run("send", str(folder), "--url", url_of(service), "--batch", "1", "--concurrency", "1")
    assert code == 1
    assert err.startswith("mwm send: disk pressure: new instances are refused"), err
    assert "99.9% full" in err and len(err.splitlines()) == 1
    assert "sent" not in out


async def test_unreachable_mwm_with_json_reports_the_error(tmp_path, small_study) -> None:
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run("send", str(folder), "--url", url, "--json")
    assert code == 1
    summary = json.loads(out)
    assert summary["error"] == f"cannot reach mwm at {url}: connection refused"
    assert (summary["stored"], summary["failed"], summary["sent"], summary["problems"]) == (0, 0, 0, [])
    assert "cannot reach mwm" in err


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (401, "a bearer token is required", "a bearer token is required (use --token or MWM_TOKEN)"),
        (403, "this token may only read", "this token may only read"),
        (404, "no application 'ct'", "no application 'ct'"),
    ],
)
async def test_an_error_every_upload_would_get_stops_after_the_first(
    tmp_path, small_study, fake_mwm, status, message, expected
) -> None:
    fake, address = await fake_mwm(status, message)
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    code, out, err = await run("send", str(folder), "--url", address, "--batch", "1", "--concurrency", "1")
    assert code == 1
    assert fake.uploads == 1, fake.requests
    assert err.splitlines() == [f"mwm send: {expected}"]
    assert "sent" not in out


async def test_unknown_app_is_checked_before_any_upload(tmp_path, small_study, fake_mwm) -> None:
    fake, address = await fake_mwm(404, "no application 'nope'", apps=False)
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    code, out, err = await run("send", str(folder), "--url", address, "--app", "nope")
    assert code == 1
    assert fake.requests == ["GET /v1/apps/nope"]
    assert err == "mwm send: no application 'nope'\n" and out == ""


async def test_unknown_app_against_mwm(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    code, out, err = await run("send", str(folder), "--url", url_of(service), "--app", "nope")
    assert code == 1
    assert "no application 'nope'" in err and len(err.splitlines()) == 1
    assert "sent" not in out
    assert await stored_instances(service) == 0


async def test_tokens_refused_by_mwm(tmp_path, make_service, small_study) -> None:
    config = base_config(
        tmp_path, server={"tokens": [{"token": ADMIN, "role": "admin"}, {"token": READ, "role": "read"}]}
    )
    service = await make_service(config)
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    code, out, err = await run("send", str(folder), "--url", url_of(service))
    assert code == 1 and "sent" not in out
    assert err == "mwm send: a bearer token is required (use --token or MWM_TOKEN)\n"
    code, out, err = await run("send", str(folder), "--url", url_of(service), env={"MWM_TOKEN": READ})
    assert code == 1 and "sent" not in out
    assert err.startswith("mwm send: this token may only read") and len(err.splitlines()) == 1
    assert await stored_instances(service, ADMIN) == 0
    code, out, err = await run("send", str(folder), "--url", url_of(service), "--token", ADMIN)
    assert code == 0, err
    assert f"{len(small_study.paths)} stored" in out


# -- per-file problems: the others are still sent ------------------------------------------------


async def test_rejected_files_do_not_stop_the_others(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "mixed"
    copies = copy_study(small_study, folder)
    (folder / "broken1.dcm").write_bytes(BROKEN)
    (folder / "broken2.dcm").write_bytes(BROKEN)
    code, out, _ = await run("send", str(folder), "--url", url_of(service), "--batch", "1", "--concurrency", "1")
    assert code == 1
    assert f"{len(copies)} stored" in out and "2 rejected" in out
    assert await stored_instances(service) == len(copies)
    # One example per reason, and a pointer to the full list.
    assert ("broken1.dcm" in out) != ("broken2.dcm" in out)
    assert "--verbose" in out


async def test_verbose_lists_every_problem_file(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "mixed"
    copy_study(small_study, folder, 2)
    (folder / "broken1.dcm").write_bytes(BROKEN)
    (folder / "broken2.dcm").write_bytes(BROKEN)
    (folder / "notes.txt").write_text("not an image")
    code, out, _ = await run("send", str(folder), "--url", url_of(service), "-v")
    assert code == 1
    lines = out.splitlines()
    for name, status in (("broken1.dcm", "rejected"), ("broken2.dcm", "rejected"), ("notes.txt", "skipped")):
        (line,) = [line for line in lines if str(folder / name) in line]
        assert line.split()[0] == status, line
    assert SKIPPED_NOT_PART10 in out


async def test_json_lists_every_problem_file_and_keeps_its_keys(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "mixed"
    copies = copy_study(small_study, folder, 3)
    (folder / "broken.dcm").write_bytes(BROKEN)
    (folder / "DICOMDIR").write_bytes(small_study.paths[5].read_bytes())
    (folder / "README.TXT").write_text("exported by a PACS")
    code, out, _ = await run("send", str(folder), "--url", url_of(service), "--json", "--quiet")
    assert code == 1
    summary = json.loads(out)
    assert {k: summary[k] for k in ("files", "stored", "duplicates", "rejected", "failed", "sent", "skipped")} == {
        "files": 6,
        "stored": 3,
        "duplicates": 0,
        "rejected": 1,
        "failed": 0,
        "sent": 4,
        "skipped": 2,
    }
    assert isinstance(summary["seconds"], float) and summary["bytes"] == sum(p.stat().st_size for p in copies) + len(
        BROKEN
    )
    assert sum(summary["reasons"].values()) == 1
    problems = {Path(p["path"]).name: p for p in summary["problems"]}
    assert set(problems) == {"broken.dcm", "DICOMDIR", "README.TXT"}
    assert problems["broken.dcm"]["status"] == "rejected" and problems["broken.dcm"]["reason"]
    assert problems["DICOMDIR"] == {"path": str(folder / "DICOMDIR"), "status": "skipped", "reason": SKIPPED_DICOMDIR}
    assert problems["README.TXT"]["reason"] == SKIPPED_NOT_PART10


# -- CD and PACS exports -------------------------------------------------------------------------------


async def test_dicomdir_and_other_files_of_an_export_are_skipped(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    export = tmp_path / "CDROM"
    copies = copy_study(small_study, export / "DICOM" / "PAT1", 6)
    # A DICOMDIR is a Part-10 file too: it is skipped by its name, not by its content.
    (export / "DICOMDIR").write_bytes(small_study.paths[8].read_bytes())
    (export / "README.TXT").write_text("Patient CD\r\n")
    (export / "AUTORUN.INF").write_bytes(b"[autorun]\r\n")
    (export / "EMPTY").write_bytes(b"")
    code, out, err = await run("send", str(export), "--url", url_of(service))
    assert code == 0, out + err
    summary_line = next(line for line in out.splitlines() if line.startswith("sent "))
    assert f"sent {len(copies)} files" in summary_line
    assert summary_line.endswith(f"{len(copies)} stored, 0 duplicates, 0 rejected, 0 failed, 4 skipped")
    assert f"1 skipped: {SKIPPED_DICOMDIR}" in out and f"3 skipped: {SKIPPED_NOT_PART10}" in out
    assert await stored_instances(service) == len(copies)


async def test_a_folder_without_dicom_files_sends_nothing(tmp_path, fake_mwm) -> None:
    fake, address = await fake_mwm(500, "must not be called")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.TXT").write_text("nothing")
    code, _, err = await run("send", str(tmp_path / "docs"), "--url", address)
    assert code == 2
    assert "no DICOM Part-10 file" in err
    assert fake.requests == []


def test_only_the_prefix_of_a_file_is_read_to_skip_it() -> None:
    # Endless: reading more than the prefix would never return.
    problem = load(Path("/dev/zero"))
    assert not isinstance(problem, bytes)
    assert (problem.status, problem.reason) == ("skipped", SKIPPED_NOT_PART10)


def test_unreadable_file_is_a_failure_not_a_crash(tmp_path) -> None:
    problem = load(tmp_path / "gone.dcm")
    assert not isinstance(problem, bytes)
    assert problem.status == "failed" and "cannot read the file" in problem.reason


# -- progress and summary -----------------------------------------------------------------------


async def test_summary_line_is_one_line_when_piped(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "a-folder-with-a-rather-long-name" / "and-another-one-inside-it"
    copy_study(small_study, folder)
    (folder / "README.TXT").write_text("x")
    code, out, _ = await run("send", str(folder), "--url", url_of(service))
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.startswith("sent ")]
    assert len(line) > 80
    assert line.endswith("0 failed, 1 skipped") and "files/s)" in line
    (example,) = [line for line in out.splitlines() if "README.TXT" in line]
    assert example.endswith(f"(e.g. {folder / 'README.TXT'})")


def test_progress_speed_counts_files() -> None:
    now = [0.0]
    column = cli._speed_column()
    with Progress(column, get_time=lambda: now[0], disable=True) as progress:
        task = progress.add_task("send", total=100)
        assert column.render(progress.tasks[task]).plain == "? files/s"
        for _ in range(10):
            now[0] += 0.5
            progress.update(task, advance=5)
        assert column.render(progress.tasks[task]).plain == "10 files/s"


async def test_progress_bar_of_send_shows_files_per_second(tmp_path, make_service, small_study, monkeypatch) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "study"
    copy_study(small_study, folder)
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(cli, "_console", lambda: terminal)
    code = await asyncio.to_thread(cli.main, ["send", str(folder), "--url", url_of(service), "--batch", "1"])
    assert code == 0
    assert "files/s" in screen.getvalue()
    assert "B/s" not in screen.getvalue() and "bytes/s" not in screen.getvalue()
