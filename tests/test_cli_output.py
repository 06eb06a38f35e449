"""What the client commands print: tables piped and on a terminal, options, addresses and errors."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import re
import struct
import termios
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support import SAMPLE_APP, base_config, eventually, python_app, url_of
from test_cli import MWM, TERMINAL_OVERRIDES, free_port, run

from mwm import __version__, cli
from mwm.client import Client, ClientError, normalise_url

ADMIN = "admin-token-0123456789"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


async def run_in_terminal(*args: str, columns: int = 80) -> tuple[int, list[str]]:
    """Run mwm with its output on a pseudo-terminal ``columns`` wide; its exit status and lines."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            *MWM,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=slave,
            stderr=asyncio.subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k not in TERMINAL_OVERRIDES},
        )
    finally:
        os.close(slave)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        output, code = await asyncio.gather(asyncio.to_thread(read_all), asyncio.wait_for(process.wait(), 60))
    finally:
        os.close(master)
    text = ANSI.sub("", output.decode())
    return code, [line.rstrip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


@pytest.fixture
async def busy(tmp_path, make_service, small_study) -> dict[str, Any]:
    """A service with a succeeded job, an open bucket, an enabled and a disabled application."""
    config = base_config(
        tmp_path,
        apps=[
            python_app("segmentation-of-the-whole-body", "pass", timeout="100ms"),
            {"id": "ct-waiting-for-more-slices", "command": SAMPLE_APP, "timeout": "1h"},
            {"id": "switched-off", "command": SAMPLE_APP, "enabled": False},
        ],
    )
    service = await make_service(config)
    url = url_of(service)
    code, _, err = await run("send", *map(str, small_study.paths), "--url", url)
    assert code == 0, err
    async with Client(url) as client:

        async def succeeded() -> list[dict[str, Any]] | None:
            jobs = (await client.get("/v1/jobs"))["jobs"]
            return jobs if jobs and all(j["state"] == "succeeded" for j in jobs) else None

        jobs = await eventually(succeeded, what="the job to succeed")
    return {"url": url, "jobs": jobs, "study_uid": small_study.study_uid}


def row(lines: list[str], text: str) -> str:
    (found,) = [line for line in lines if text in line]
    return found


# -- tables -----------------------------------------------------------------------------------


async def test_piped_tables_have_one_row_per_line(busy) -> None:
    code, out, _ = await run("jobs", "--url", busy["url"])
    assert code == 0
    lines = out.splitlines()
    assert sum("succeeded" in line for line in lines) == len(busy["jobs"]) == 1
    assert row(lines, "segmentation-of-the-whole-body").split()[:3] == [
        str(busy["jobs"][0]["id"]),
        "segmentation-of-the-whole-body",
        "succeeded",
    ]
    assert all(line == line.rstrip() for line in lines)

    code, out, _ = await run("buckets", "--url", busy["url"])
    assert code == 0
    assert busy["study_uid"] in row(out.splitlines(), "ct-waiting-for-more-slices")

    code, out, _ = await run("apps", "--url", busy["url"])
    assert code == 0
    lines = out.splitlines()
    assert row(lines, "switched-off").split()[2] == "no"
    assert row(lines, "ct-waiting-for-more-slices").split()[2] == "yes"
    assert "True" not in out and "False" not in out


async def test_piped_job_details_keep_uids_on_their_line(busy) -> None:
    code, out, _ = await run("jobs", "show", str(busy["jobs"][0]["id"]), "--url", busy["url"])
    assert code == 0
    assert row(out.splitlines(), "study ").split() == ["study", busy["study_uid"]]


async def test_tables_on_an_80_column_terminal_cut_long_cells_with_an_ellipsis(busy) -> None:
    code, lines = await run_in_terminal("buckets", "--url", busy["url"], columns=80)
    assert code == 0, lines
    assert all(len(line) <= 80 for line in lines), lines
    bucket = row(lines, "ct-waiting-for")
    # The study UID (the column cut first) and the application id end with an ellipsis.
    app, uid = bucket.split()[1], bucket.split()[3]
    assert uid.endswith("…") and busy["study_uid"].startswith(uid[:-1]) and len(uid) >= 12
    assert app.endswith("…") and "ct-waiting-for-more-slices".startswith(app[:-1]) and len(app) > len(uid)
    assert len(lines) == 3 + 1  # title, header, rule, one bucket: no line holds the rest of a cell

    code, lines = await run_in_terminal("jobs", "--url", busy["url"], columns=80)
    assert code == 0, lines
    assert row(lines, "succeeded").split()[2] == "succeeded"


def test_a_narrow_terminal_cuts_the_widest_columns_first() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80, color_system=None)
    uid = "1.2.826.0.1.3680043.8.498.35817825522793880380727188626888318867"
    error = "the application exited with status 1: Traceback (most recent call last)"
    columns = ["id", "app", "state", "study", "error"]
    rows = [(1, "ct", "succeeded", uid, None), (2, "ct", "failed", uid, error)]
    cli._table("jobs", columns, rows, console=console)
    lines = screen.getvalue().splitlines()
    assert len(lines) == 5 and all(len(line) <= 80 for line in lines), lines
    first, second = lines[3].split(), lines[4].split()
    assert first[:3] == ["1", "ct", "succeeded"] and second[:3] == ["2", "ct", "failed"]
    assert first[3].endswith("…") and uid.startswith(first[3][:-1])
    assert second[-1].endswith("…") and "the application exited" in lines[4]
    assert len(lines[4]) == 80  # as wide as the terminal allows: no more is cut than needed

    # The error is cut first: the study UID keeps more of its characters.
    screen.seek(0)
    screen.truncate()
    cli._table("jobs", columns, rows, console=console, cut_first=["error"])
    lines = screen.getvalue().splitlines()
    assert len(lines) == 5 and all(len(line) <= 80 for line in lines), lines
    assert len(lines[4].split()[3]) > len(second[3]) and lines[4].endswith("…")


def test_the_jobs_table_fits_an_80_column_terminal() -> None:
    """The widest listing, with a long error and a long application id, on an 80-column terminal."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80, color_system=None)
    columns = ["id", "app", "state", "attempt", "inst", "res", "created", "run", "error"]
    error = "exited with code 3: ValueError: this is a very long explanation of what went wrong"
    rows = [(12, "segmentation-of-the-whole-body", "failed", "3/3", 120, 0, "3h00m", "0.4s", error)]
    cli._table("jobs", columns, rows, console=console, cut_first=["error"])
    lines = screen.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    number, app, state = lines[-1].split()[:3]
    assert (number, state) == ("12", "failed") and app.startswith("segmentatio") and app.endswith("…")
    assert lines[-1].endswith("…") and "exited with" in lines[-1]


def test_piped_tables_are_never_cut(capfd) -> None:
    uid = "1.2.826.0.1.3680043.8.498.35817825522793880380727188626888318867"
    error = "x" * 300
    cli._table("jobs", ["id", "state", "study", "error"], [(1, "succeeded", uid, error)])
    lines = capfd.readouterr().out.splitlines()
    assert lines[-1].split() == ["1", "succeeded", uid, error]


def test_an_empty_table_says_so(capfd) -> None:
    cli._table("deliveries", ["id", "state"], [])
    assert capfd.readouterr().out == "no deliveries\n"


async def test_apps_show_is_one_key_per_line(busy) -> None:
    code, out, _ = await run("apps", "show", "ct-waiting-for-more-slices", "--url", busy["url"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "application ct-waiting-for-more-slices (config)  engine=local  enabled=yes"
    assert row(lines, "  timeout ").split() == ["timeout", "1h00m"]
    assert row(lines, "grouping").split() == ["grouping", "study"]
    assert row(lines, "command").split()[1:] == [str(part) for part in SAMPLE_APP]
    assert not out.lstrip().startswith("{")
    code, out, _ = await run("apps", "show", "ct-waiting-for-more-slices", "--json", "--url", busy["url"])
    assert json.loads(out)["id"] == "ct-waiting-for-more-slices"


async def test_tui_has_no_json_option() -> None:
    code, _, err = await run("tui", "--json")
    assert code == 2 and "unrecognized arguments: --json" in err


# -- options ------------------------------------------------------------------------------------


async def test_version_option_prints_the_version() -> None:
    code, out, err = await run("--version")
    assert (code, err) == (0, "")
    assert out == f"mwm {__version__}\n"
    assert (await run("version"))[1] == out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--concurrency", "0", "argument --concurrency: must be 1 or more, not 0"),
        ("--batch", "-1", "argument --batch: must be 1 or more, not -1"),
        ("--batch", "many", "argument --batch: expected a whole number, not 'many'"),
        ("--correlation-id", "x" * 129, "argument --correlation-id: must be printable and at most 128 characters"),
    ],
)
async def test_send_options_are_checked(tmp_path, option, value, message) -> None:
    code, out, err = await run("send", str(tmp_path), option, value)
    assert code == 2 and out == ""
    assert f"mwm send: error: {message}" in err and "Traceback" not in err


# -- addresses and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("localhost:8080/", "http://localhost:8080"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("HTTPS://mwm.example.org", "HTTPS://mwm.example.org"),
        (" [::1]:8080 ", "http://[::1]:8080"),
    ],
)
def test_an_address_without_a_scheme_is_http(given: str, url: str) -> None:
    assert normalise_url(given) == url
    assert Client(given).url == url


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("ftp://127.0.0.1:8080", "--url must start with http:// or https://"),
        ("ws://127.0.0.1:8080", "--url must start with http:// or https://"),
        ("127.0.0.1:99999", "--url is not a valid address"),
        ("", "--url is empty"),
    ],
)
def test_an_address_mwm_cannot_use_is_a_client_error(given: str, message: str) -> None:
    with pytest.raises(ClientError) as error:
        Client(given)
    assert error.value.message.startswith(message)


async def test_url_without_scheme_reaches_mwm(tmp_path, make_service) -> None:
    service = await make_service(base_config(tmp_path))
    address = f"127.0.0.1:{service.http_port}"
    code, out, err = await run("apps", "--json", "--url", address)
    assert code == 0, err
    assert json.loads(out) == {"apps": []}
    code, out, err = await run("jobs", "--json", env={"MWM_URL": address})
    assert code == 0, err
    assert json.loads(out)["jobs"] == []


async def test_url_with_another_scheme_is_a_usage_error() -> None:
    code, out, err = await run("jobs", "--url", "ftp://127.0.0.1:8080")
    assert (code, out) == (2, "")
    assert err == "mwm jobs: --url must start with http:// or https:// (ftp:// is not supported)\n"


async def test_unreachable_mwm_is_one_clean_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run("jobs", "--url", url)
    assert code == 1
    assert err == f"mwm: cannot reach mwm at {url}: connection refused\n"


async def test_a_missing_token_says_how_to_give_one(tmp_path, make_service) -> None:
    service = await make_service(base_config(tmp_path, server={"tokens": [{"token": ADMIN, "role": "admin"}]}))
    code, _, err = await run("jobs", "--url", url_of(service))
    assert code == 1
    assert err == "mwm: a bearer token is required (use --token or MWM_TOKEN)\n"
    code, _, err = await run("jobs", "--url", url_of(service), env={"MWM_TOKEN": ADMIN})
    assert code == 0, err


async def test_a_token_read_from_a_file_with_its_line_end_works(tmp_path, make_service) -> None:
    service = await make_service(base_config(tmp_path, server={"tokens": [{"token": ADMIN, "role": "admin"}]}))
    code, _, err = await run("jobs", "--url", url_of(service), env={"MWM_TOKEN": ADMIN + "\r\n"})
    assert code == 0, err
    code, out, err = await run("jobs", "--url", url_of(service), env={"MWM_TOKEN": ADMIN[:8] + "\x07" + ADMIN[8:]})
    assert code == 1 and err == "mwm: the token contains spaces or control characters (--token, MWM_TOKEN)\n"
    assert ADMIN[8:] not in out + err


async def test_a_ca_certificate_that_cannot_be_used_is_one_line(tmp_path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    for cafile, reason in ((tmp_path / "missing.pem", "No such file or directory"), (empty, "")):
        code, _, err = await run("sinks", "--url", f"127.0.0.1:{free_port()}", "--cacert", str(cafile))
        assert code == 1, err
        assert err.startswith(f"mwm: cannot use the CA certificate {cafile} (--cacert, MWM_CACERT): ")
        assert reason in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.toml", None, "missing.toml: cannot read it: No such file or directory"),
        ("app.toml", "id = 'x'\ncommand = [", "app.toml: not valid TOML: "),
        ("app.json", '{"id": "x",', "app.json: not valid JSON: "),
        ("app.json", '["x"]', "app.json: expected one application (a JSON object), not list"),
    ],
)
@pytest.mark.parametrize("action", ["add", "update"])
async def test_apps_add_with_a_bad_file_is_one_line(
    tmp_path: Path, action: str, name: str, content: str | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    # Read before anything is asked of mwm: nothing listens at this address.
    code, out, err = await run("apps", action, str(path), "--url", f"127.0.0.1:{free_port()}")
    assert (code, out) == (2, "")
    assert err.startswith(f"mwm apps {action}: {tmp_path / message}") and len(err.splitlines()) == 1, err


async def test_apps_update_needs_the_id_in_the_file(tmp_path) -> None:
    path = tmp_path / "app.json"
    path.write_text('{"command": ["true"]}')
    code, _, err = await run("apps", "update", str(path), "--url", f"127.0.0.1:{free_port()}")
    assert code == 2
    assert err == f"mwm apps update: {path}: the application has no id\n"


async def test_apps_add_from_toml(tmp_path, make_service) -> None:
    service = await make_service(base_config(tmp_path))
    path = tmp_path / "app.toml"
    path.write_text("id = 'from-toml'\ncommand = ['true']\nenabled = false\n")
    code, out, err = await run("apps", "add", str(path), "--url", url_of(service))
    assert code == 0, err
    assert out == "application from-toml saved\n"
    code, out, _ = await run("apps", "--url", url_of(service))
    assert row(out.splitlines(), "from-toml").split()[2] == "no"
