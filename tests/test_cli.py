"""The command line, as a user runs it: ``mwm serve`` as a process, the other commands against it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, SAMPLE_APP, WRITE_R, base_config, python_app, url_of

MWM = [sys.executable, "-m", "mwm"]

#: Variables that make rich treat any output as a terminal: the commands run here write to pipes.
TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *MWM,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if k not in TERMINAL_OVERRIDES}, **(env or {})},
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_quickstart_configuration_end_to_end(tmp_path, small_study) -> None:
    """The README's first command: mwm serve with the sample configuration, then mwm send."""
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MWM_SERVER_HTTP": f"127.0.0.1:{port}",
        "MWM_URL": url,
        "MWM_SERVER_DISK_RESERVE": "16MB",
        "MWM_SERVER_DISK_WATERMARK": "99.9",
    }
    server = await asyncio.create_subprocess_exec(
        *MWM,
        "serve",
        "--config",
        str(ROOT / "samples" / "config" / "mwm.toml"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(200):
            code, out, _ = await run("apps", "--json", env=env)
            if code == 0:
                break
            await asyncio.sleep(0.05)
        assert [a["id"] for a in json.loads(out)["apps"]] == ["ct-sample"]

        code, out, err = await run("send", str(small_study.paths[0].parent.parent), env=env)
        assert code == 0, err
        assert f"sent {len(small_study.paths)} files" in out and f"{len(small_study.paths)} stored" in out

        code, out, _ = await run("buckets", env=env)
        assert code == 0 and "ct-sample" in out

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            code, out, _ = await run("jobs", "--json", env=env)
            jobs = json.loads(out)["jobs"]
            if jobs and jobs[0]["state"] == "succeeded":
                break
            await asyncio.sleep(0.5)
        assert jobs[0]["state"] == "succeeded"
        code, out, _ = await run("jobs", "show", str(jobs[0]["id"]), env=env)
        assert code == 0 and "body_seg.dcm" in out and "delivered" in out
        seg = tmp_path / "results" / small_study.study_uid / "ct-sample" / "body_seg.dcm"
        assert seg.is_file()
        code, out, _ = await run("sinks", env=env)
        assert "gateway" in out and "pull" in out
    finally:
        server.send_signal(signal.SIGTERM)
        _, err_bytes = await asyncio.wait_for(server.communicate(), 30)
    assert server.returncode == 0, err_bytes.decode()
    assert "stopping" in err_bytes.decode()


async def test_client_commands(tmp_path, make_service, small_study) -> None:
    config = base_config(tmp_path, apps=[{"id": "ct", "command": SAMPLE_APP, "timeout": "1h"}])
    service = await make_service(config)
    env = {"MWM_URL": url_of(service)}
    code, out, err = await run(
        "send",
        *map(str, small_study.paths[:3]),
        "--correlation-id",
        "study-42",
        "--calling-aet",
        "CT1",
        "--json",
        env=env,
    )
    assert code == 0, err
    assert json.loads(out)["stored"] == 3
    code, out, _ = await run("buckets", "--json", env=env)
    (bucket,) = json.loads(out)["buckets"]
    assert bucket["correlation_id"] == "study-42" and bucket["instance_count"] == 3
    code, out, _ = await run("buckets", "close", str(bucket["id"]), env=env)
    assert code == 0 and "closed: job" in out
    job_id = int(out.split("job ")[1].split()[0])
    code, out, _ = await run("jobs", "cancel", str(job_id), env=env)
    assert code == 0 and f"job {job_id}: cancelled" in out
    code, out, _ = await run("jobs", "retry", str(job_id), env=env)
    assert code == 0 and f"job {job_id}: scheduled" in out
    code, _, err = await run("jobs", "retry", str(job_id), env=env)
    assert code == 1 and "only failed or cancelled jobs" in err
    code, _, err = await run("jobs", "show", "999", env=env)
    assert code == 1 and "no job 999" in err


async def test_results_of_a_pull_sink_are_listed_downloaded_and_acknowledged(tmp_path, make_service, small_study):
    script = "import os; open(os.environ['HOLOSCAN_OUTPUT_PATH'] + '/report.txt', 'w').write('body: 42 cm')"
    config = base_config(
        tmp_path,
        apps=[python_app("ct", script, timeout="100ms", sinks=["gateway"])],
        sinks=[{"id": "gateway", "kind": "pull"}],
    )
    service = await make_service(config)
    env = {"MWM_URL": url_of(service)}
    code, _, err = await run("send", *map(str, small_study.paths[:2]), env=env)
    assert code == 0, err
    for _ in range(600):
        code, out, _ = await run("results", "--sink", "gateway", "--json", env=env)
        waiting = json.loads(out)["results"]
        if waiting:
            break
        await asyncio.sleep(0.1)
    (result,) = waiting
    code, out, _ = await run("results", "--sink", "gateway", env=env)
    assert code == 0 and "report.txt" in out and f"\n{result['id']} " in out

    code, out, err = await run("results", "get", str(result["id"]), env=env, cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "report.txt").read_text() == "body: 42 cm" and "11 bytes saved to report.txt" in out
    code, _, err = await run("results", "get", str(result["id"]), env=env, cwd=tmp_path)
    assert code == 1 and "report.txt exists" in err  # never overwritten unasked
    code, _, err = await run("results", "get", str(result["id"]), "-o", str(tmp_path / "copy.txt"), env=env)
    assert code == 0 and (tmp_path / "copy.txt").read_text() == "body: 42 cm"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    code, out, _ = await run("results", "get", str(result["id"]), "-o", "-", env=env)
    assert code == 0 and out == "body: 42 cm"
    nowhere = tmp_path / "nowhere" / "report.txt"
    code, _, err = await run("results", "get", str(result["id"]), "-o", str(nowhere), env=env)
    assert code == 1 and err == f"mwm: cannot write {nowhere}: No such file or directory\n"

    code, out, _ = await run("results", "ack", str(result["id"]), env=env)
    assert code == 0 and "acknowledged on 1 pull sink(s)" in out
    code, _, err = await run("results", "ack", str(result["id"]), env=env)
    assert code == 1 and f"result {result['id']} is not waiting on any pull sink" in err
    code, out, _ = await run("results", "--sink", "gateway", "--json", env=env)
    assert json.loads(out)["results"] == []
    code, _, err = await run("results", "get", env=env)
    assert code == 2 and "give the result's ID" in err
    code, _, err = await run("results", "get", "999999", env=env, cwd=tmp_path)
    assert code == 1 and "no result 999999" in err


async def test_a_job_waiting_to_be_retried_says_when(tmp_path, make_service, small_study) -> None:
    config = base_config(
        tmp_path,
        apps=[python_app("flaky", "import sys; sys.exit(2)", timeout="100ms", max_attempts=3)],
        jobs={"retry_backoff": "1h", "retry_backoff_max": "1h"},
    )
    service = await make_service(config)
    env = {"MWM_URL": url_of(service)}
    assert (await run("send", str(small_study.paths[0]), env=env))[0] == 0
    for _ in range(300):
        code, out, _ = await run("jobs", "--json", env=env)
        jobs = json.loads(out)["jobs"]
        if jobs and jobs[0]["attempt"] == 1 and jobs[0]["state"] == "scheduled":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the job did not fail once and wait: {jobs}")
    code, out, _ = await run("jobs", "show", str(jobs[0]["id"]), env=env)
    assert code == 0
    assert f"next attempt    {jobs[0]['not_before']} (attempt 2/3)" in out
    assert "last error" in out and "exited with code 2" in out


async def test_failed_deliveries_are_retried_together(tmp_path, make_service, small_study) -> None:
    script = WRITE_R
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the sink wants a folder")
    config = base_config(
        tmp_path,
        apps=[python_app("ct", script, timeout="100ms", sinks=["out"], grouping="series")],
        sinks=[{"id": "out", "kind": "folder", "path": str(blocked)}],
        delivery={"max_attempts": 1},
    )
    service = await make_service(config)
    env = {"MWM_URL": url_of(service)}
    assert (await run("send", *map(str, small_study.paths), env=env))[0] == 0  # two series: two jobs
    for _ in range(600):
        failed = json.loads((await run("deliveries", "--state", "failed", "--json", env=env))[1])["deliveries"]
        if len(failed) == 2:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"expected two failed deliveries, got {failed}")
    code, out, _ = await run("deliveries", env=env)
    assert code == 0 and "next attempt" in out.splitlines()[1]
    ids = sorted(str(d["id"]) for d in failed)
    code, out, err = await run("deliveries", "retry", *ids, "999999", env=env)
    assert code == 1
    assert [line.split(":")[0] for line in out.splitlines()] == [f"delivery {i}" for i in ids]
    assert "delivery 999999: no delivery 999999" in err
    code, _, err = await run("deliveries", "retry", env=env)
    assert code == 2 and "give the ids" in err


async def test_send_reports_rejections_with_reasons(tmp_path, make_service, small_study) -> None:
    service = await make_service(base_config(tmp_path))
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(small_study.paths[0].read_bytes())
    # A Part-10 prefix, then nothing mwm can read: sent, and rejected by the service.
    (folder / "broken.dcm").write_bytes(bytes(128) + b"DICM" + b"\xff" * 64)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.dcm").write_bytes(small_study.paths[1].read_bytes())
    code, out, _ = await run("send", str(folder), "--url", url_of(service))
    assert code == 1
    assert "sent 3 files" in out and "2 stored" in out and "1 rejected" in out
    assert "broken.dcm" in out


async def test_unreachable_service_is_a_clear_error() -> None:
    code, _, err = await run("jobs", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach mwm" in err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[server]\nhttp = 'nowhere'\n", "server.http: expected HOST:PORT"),
        ("[[apps]]\nid = 'x'\nengine = 'kubernetes'\ncommand = ['true']\n", "apps[0].engine: unknown engine"),
        ("[[apps]]\nid = 'x'\n", "apps[0].command: required key is missing"),
        ("[[sinks]]\nid = 's'\nkind = 'ftp'\n", "sinks[0].kind: unknown sink kind 'ftp'"),
        ("[server]\nhttp = '0.0.0.0:0'\n", "refusing to listen on 0.0.0.0"),
        ("[[apps]]\nid = 'x'\nengine = 'lokal'\ncommand = ['true']\n", "apps[0].engine: unknown engine 'lokal'"),
        ("[[sinks]]\nid = 's'\nkind = 'folder'\n", "sinks[0].path: required key is missing"),
        ("[storage]\nfsync = 'maybe'\n", "storage.fsync: "),
    ],
)
async def test_serve_refuses_a_bad_configuration(tmp_path, config, message) -> None:
    """Whether found on reading the file or while starting, a configuration error is said the same
    way, names the key, and exits 2."""
    path = tmp_path / "mwm.toml"
    path.write_text(config + f"\n[database]\npath = '{tmp_path / 'db.sqlite'}'\n")
    code, _, err = await run("serve", "--config", str(path), cwd=tmp_path)
    assert code == 2, err
    assert err.startswith("mwm: configuration error: ") and message in err, err
    assert "Traceback" not in err


async def test_a_data_folder_that_is_a_file_is_a_configuration_error(tmp_path) -> None:
    path = tmp_path / "mwm.toml"
    path.write_text("[server]\nhttp = '127.0.0.1:0'\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = await run("serve", "--config", str(path), env={"MWM_SERVER_DATA_DIR": str(blocker)}, cwd=tmp_path)
    assert code == 2, err
    assert err.startswith(f"mwm: configuration error: server.data_dir: cannot use {blocker}: ")
    assert "(set by MWM_SERVER_DATA_DIR)" in err


async def test_an_http_port_in_use_is_a_configuration_error(tmp_path) -> None:
    path = tmp_path / "mwm.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path / 'data'}'\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code, _, err = await run("serve", "--config", str(path), env={"MWM_SERVER_HTTP": address}, cwd=tmp_path)
    assert code == 2, err
    assert err.startswith(f"mwm: configuration error: server.http: cannot listen on {address}: ")
    assert "(set by MWM_SERVER_HTTP)" in err and "Traceback" not in err


async def test_a_bad_value_from_the_environment_is_named_even_when_found_at_start(tmp_path) -> None:
    path = tmp_path / "mwm.toml"
    path.write_text(f"[server]\nhttp = '127.0.0.1:0'\ndata_dir = '{tmp_path / 'data'}'\n")
    code, _, err = await run("serve", "--config", str(path), env={"MWM_STORAGE_FSYNC": "maybe"}, cwd=tmp_path)
    assert code == 2 and err.startswith("mwm: configuration error: storage.fsync: "), err
    assert "(set by MWM_STORAGE_FSYNC)" in err


async def test_send_says_which_applications_the_instances_went_to(tmp_path, make_service, small_study) -> None:
    config = base_config(
        tmp_path, apps=[{"id": "ct", "command": ["true"], "timeout": "1h", "match": {"called_aet": ["MWM"]}}]
    )
    service = await make_service(config)
    env = {"MWM_URL": url_of(service)}
    code, out, err = await run("send", *map(str, small_study.paths[:2]), "--called-aet", "MWM", env=env)
    assert code == 0, err
    assert "routed to: ct (2)" in out and "matched no application" not in out
    code, out, err = await run("send", *map(str, small_study.paths[2:5]), "--called-aet", "OTHER", env=env)
    assert code == 0, err
    assert "3 matched no application: stored only, nothing will process them" in out and "routed to" not in out
    code, out, _ = await run("send", *map(str, small_study.paths[5:7]), "--called-aet", "MWM", "--json", env=env)
    summary = json.loads(out)
    assert (summary["routed"], summary["unrouted"]) == ({"ct": 2}, 0)
