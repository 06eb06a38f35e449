"""The plugin interface, proven by a sink packaged on its own in plugins/ (mwm-webhook)."""

from __future__ import annotations

import sys

import pytest
from aiohttp import web
from support import base_config, eventually, upload_files, url_of, wait_jobs

from mwm import plugins
from mwm.errors import PluginError

WRITE_TWO = (
    "import os, pathlib; out = pathlib.Path(os.environ['HOLOSCAN_OUTPUT_PATH']);"
    "(out / 'report.txt').write_text('ok'); (out / 'nested').mkdir(); (out / 'nested' / 'x.json').write_text('{}')"
)


def test_the_plugin_is_found_by_name_without_importing_it() -> None:
    assert "webhook" in plugins.available(plugins.SINKS)
    assert {"folder", "pull"} <= set(plugins.available(plugins.SINKS))
    assert "local" in plugins.available(plugins.ENGINES)
    with pytest.raises(PluginError, match=r"unknown sink kind 'carrier-pigeon' \(installed: .*webhook"):
        plugins.load(plugins.SINKS, "carrier-pigeon")


async def test_webhook_sink_delivers_with_retries(tmp_path, make_service, client_for, small_study) -> None:
    received: list[dict] = []
    answers = iter([503, 200])

    async def hook(request: web.Request) -> web.Response:
        status = next(answers, 200)
        if status == 200:
            received.append(await request.json())
            assert request.headers["Authorization"] == "Bearer s3cret-token-for-tests"
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        config = base_config(
            tmp_path,
            apps=[
                {
                    "id": "writer",
                    "command": [sys.executable, "-c", WRITE_TWO],
                    "arguments": False,
                    "timeout": "100ms",
                    "sinks": ["notify"],
                }
            ],
            sinks=[
                {
                    "id": "notify",
                    "kind": "webhook",
                    "url": f"http://127.0.0.1:{port}/hook",
                    "token": "s3cret-token-for-tests",
                    "timeout": "5s",
                    "public_url": "http://mwm.example",
                }
            ],
        )
        service = await make_service(config)
        client = await client_for(service)
        await upload_files(client, small_study.paths)
        (job,) = await wait_jobs(client, 1)

        async def delivered():
            rows = (await client.get("/v1/deliveries"))["deliveries"]
            return rows if rows and all(d["state"] == "delivered" for d in rows) else None

        rows = await eventually(delivered, what="webhook deliveries")
        assert all(d["attempts"] == 2 for d in rows)  # the first try got a 503
        (document,) = received
        assert document["sink"] == "notify"
        assert sorted(r["path"] for r in document["results"]) == ["nested/x.json", "report.txt"]
        assert all(
            r["job_id"] == job["id"] and r["download"].startswith("http://mwm.example/v1/results/")
            for r in document["results"]
        )
        assert url_of(service).startswith("http://127.0.0.1:")
    finally:
        await runner.cleanup()
