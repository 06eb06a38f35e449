"""One mwm per data folder: a second server on the same folder (or database) refuses to start and
harms nothing of the first; the folder is free again once the first has stopped or died."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
from support import base_config, python_app, upload_files, wait_job_state, wait_jobs

from mwm.config import settings_from_mapping
from mwm.datalock import DataFolderInUse
from mwm.service import Service

SLEEP = "import time; time.sleep(30)"


async def test_a_second_server_on_the_same_folder_refuses_and_leaves_the_first_running_jobs_alone(
    tmp_path, make_service, client_for, small_study
) -> None:
    config = base_config(tmp_path, apps=[python_app("slow", SLEEP, timeout="200ms", grouping="study")])
    first = await make_service(config)
    client = await client_for(first)
    await upload_files(client, small_study.paths[:2])
    (job,) = await wait_jobs(client, 1, states=("running",))

    second = Service(settings_from_mapping(config))
    with pytest.raises(DataFolderInUse) as refused:
        await second.start()
    data = tmp_path / "data"
    assert refused.value.message == f"the data folder {data} is in use by another mwm (process {os.getpid()})"

    await asyncio.sleep(0.5)  # a second server that got in would have stopped the job as an orphan
    assert (await client.get(f"/v1/jobs/{job['id']}"))["state"] == "running"
    await client.post(f"/v1/jobs/{job['id']}/cancel")
    await wait_job_state(client, job["id"], ("cancelled",))


async def test_the_folder_is_free_again_once_its_server_stopped(tmp_path, make_service) -> None:
    config = base_config(tmp_path)
    first = await make_service(config)
    await first.stop()
    again = await make_service(config)
    assert again.http_port


async def test_a_database_outside_the_data_folder_is_locked_too(tmp_path, make_service) -> None:
    database = {"path": str(tmp_path / "shared" / "mwm.db")}
    await make_service(base_config(tmp_path / "one", database=database))
    other = Service(settings_from_mapping(base_config(tmp_path / "two", database=database)))
    with pytest.raises(DataFolderInUse, match=f"the database {tmp_path / 'shared' / 'mwm.db'} is in use by another"):
        await other.start()


async def test_another_folder_given_this_servers_database_is_refused(tmp_path, make_service) -> None:
    """The first server keeps its database in its data folder (the default); a second one with
    its own data folder but pointed at that database is refused, naming the database."""
    await make_service(base_config(tmp_path))
    database = tmp_path / "data" / "mwm.db"
    other = Service(settings_from_mapping(base_config(tmp_path / "other", database={"path": str(database)})))
    with pytest.raises(DataFolderInUse) as refused:
        await other.start()
    assert refused.value.message == f"the database {database} is in use by another mwm (process {os.getpid()})"


async def test_a_killed_server_leaves_no_lock_behind_and_the_cli_names_the_holder(tmp_path) -> None:
    """Over real processes: the second ``mwm serve`` says who holds the folder and exits 1; once
    the holder is killed (SIGKILL, no clean-up), the folder can be taken at once."""
    config = tmp_path / "mwm.toml"
    config.write_text(f'[server]\nhttp = "127.0.0.1:0"\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    argv = [sys.executable, "-m", "mwm", "serve", "--config", str(config)]
    holder = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    try:
        lock = tmp_path / "data" / "mwm.lock"
        for _ in range(300):
            if lock.exists() and lock.read_text().strip() == str(holder.pid):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the first server never took the data folder")
        second = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 1
        assert f"is in use by another mwm (process {holder.pid})" in err.decode()
    finally:
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
    third = Service(settings_from_mapping(base_config(tmp_path)))
    await third.start()
    await third.stop()
