"""Support of the console's tests: a real mwm in a thread, a scene of known jobs, a frozen clock.

Snapshot tests call ``snap_compare``, which runs the app in an event loop of its own in the test's
thread; the mwm they watch therefore runs in another thread, with its own loop
(:class:`ThreadedService`). Behaviour tests are async and use ``make_service`` as the rest of
the suite does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import synthetic
from support import base_config, upload_files

from mwm.client import Client
from mwm.config import settings_from_mapping
from mwm.service import Service
from mwm.tui.app import MwmApp

T = TypeVar("T")
DISPLAY_URL = "http://mwm.example:8080"
#: How far after the scene was built the frozen clock stands: ages read "3h00m", and the open
#: buckets' countdowns (10 h timeouts) "6h59m", whatever the few seconds building took.
CLOCK_OFFSET = 3 * 3600 + 30.0
ISO_IN_TEXT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?")
FIXED_STORAGE = {"free_bytes": 80 * 2**30, "total_bytes": 250 * 2**30, "used_bytes": 170 * 2**30}
FREE_TEXT_KEYS = {"error", "last_error", "message", "log_tail"}


class ThreadedService:
    """A real mwm running in a thread of its own (with its own event loop)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.service: Service | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="mwm-under-test", daemon=True)

    def start(self) -> ThreadedService:
        self._thread.start()
        self._started.result(30)
        return self

    @property
    def url(self) -> str:
        assert self.service is not None
        return f"http://127.0.0.1:{self.service.http_port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if not self._started.done():  # start() raises it in the test's thread
                self._started.set_exception(exc)
                return
            raise

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        service = Service(settings_from_mapping(self.config))
        await service.start()
        self.service = service
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await service.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine in mwm's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def _normalise_text(text: str, root: str) -> str:
    return ISO_IN_TEXT.sub("2024-05-06T07:08:09+0000", text.replace(root, "/srv/mwm"))


def normalise(data: Any, root: str, key: str = "") -> Any:
    """Machine- and moment-specific values made fixed: the temporary folder, disk space, the minute
    the ingest rate falls in, and times written into free text (logs, errors)."""
    if isinstance(data, dict):
        out = {k: normalise(v, root, k) for k, v in data.items()}
        if "ingest_per_minute" in out:
            rate = out["ingest_per_minute"]
            out["ingest_per_minute"] = [0] * (len(rate) - 1) + [sum(rate)]
        if isinstance(out.get("storage"), dict) and "free_bytes" in out["storage"]:
            out["storage"] = dict(FIXED_STORAGE)
        if isinstance(out.get("disk"), dict) and "free_bytes" in out["disk"]:
            out["disk"] = {**out["disk"], "free_bytes": FIXED_STORAGE["free_bytes"]}
        return out
    if isinstance(data, list):
        return [normalise(v, root, key) for v in data]
    if isinstance(data, str):
        if key in FREE_TEXT_KEYS:
            return _normalise_text(data, root)
        return data.replace(root, "/srv/mwm")
    return data


def normalising_client(root: Path) -> Callable[[str, str | None], Client]:
    """A ``Client`` factory whose answers are passed through :func:`normalise`."""
    prefix = str(root)

    class NormalisingClient(Client):
        async def request(self, method: str, path: str, **kwargs: Any) -> Any:
            answer = await super().request(method, path, **kwargs)
            if isinstance(answer, bytes):
                return _normalise_text(answer.decode("utf-8", "replace"), prefix).encode()
            return normalise(answer, prefix)

    def factory(url: str, token: str | None) -> Client:
        return NormalisingClient(url, token)

    return factory


def frozen_clock(at: float) -> Callable[[], float]:
    return lambda: at


async def until(pilot: Any, check: Callable[[], Any], *, timeout: float = 20.0, what: str = "the app") -> None:
    """Let the app run until ``check()`` is true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)


def data_loaded(app: MwmApp) -> bool:
    store = app.store
    return all(
        getattr(store, topic) is not None for topic in ("stats", "buckets", "jobs", "apps", "sinks", "deliveries")
    )


# -- the scene of the snapshot tests ----------------------------------------------------------

PY = "python3"
SEG = (
    "import os; print('segmenting 2 slices'); "
    "open(os.path.join(os.environ['HOLOSCAN_OUTPUT_PATH'], 'mask.txt'), 'w').write('liver')"
)
TRIAGE = "import sys; print('loading model'); print('model weights missing', file=sys.stderr); sys.exit(3)"


def scene_config(root: Path) -> dict[str, Any]:
    (root / "not-a-folder").write_text("a file where the broken sink expects a folder")
    held = {"timeout": "10h", "max_age": "20h", "arguments": False}
    return base_config(
        root,
        jobs={"max_attempts": 1, "retry_backoff": "100ms"},
        delivery={"max_attempts": 1, "retry_backoff": "100ms"},
        apps=[
            {
                "id": "seg",
                "name": "Liver segmentation",
                "version": "1.2.0",
                "command": [PY, "-c", SEG],
                "match": {"modality": ["CT"]},
                "sinks": ["archive", "broken", "gateway"],
                **held,
            },
            {"id": "triage", "name": "Triage", "version": "0.9", "command": [PY, "-c", TRIAGE], **held},
            {"id": "hold", "name": "Hold for review", "command": ["sleep", "600"], **held},
        ],
        sinks=[
            {"id": "archive", "kind": "folder", "path": str(root / "archive")},
            {"id": "broken", "kind": "folder", "path": str(root / "not-a-folder" / "results")},
            {"id": "gateway", "kind": "pull"},
        ],
    )


async def _wait(client: Client, path: str, check: Callable[[Any], bool], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        answer = await client.get(path)
        if check(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {answer}")
        await asyncio.sleep(0.05)


async def build_scene(url: str, studies: list[synthetic.StudyInfo]) -> None:
    """Buckets 1-4 closed into jobs 1-4 (two succeeded, one failed, one cancelled); buckets 5 and 6
    stay open. Each ``seg`` result goes to three sinks: delivered, failed and pending (pull)."""
    async with Client(url) as client:
        for number, (study, app) in enumerate(zip(studies[:4], ("seg", "seg", "triage", "hold"), strict=True), 1):
            await upload_files(client, study.paths, apps=[app], headers={"X-Correlation-ID": f"scene-{number}"})
        for bucket_id, state in ((1, "succeeded"), (2, "succeeded"), (3, "failed")):
            await client.post(f"/v1/buckets/{bucket_id}/close")
            await _wait(client, f"/v1/jobs/{bucket_id}", lambda j, s=state: j["state"] == s, f"job {bucket_id}")
        await client.post("/v1/buckets/4/close")
        await _wait(client, "/v1/jobs/4", lambda j: j["state"] == "running", "job 4 running")
        await client.post("/v1/jobs/4/cancel")
        await _wait(client, "/v1/jobs/4", lambda j: j["state"] == "cancelled", "job 4 cancelled")
        for number, study in enumerate(studies[4:], 5):
            await upload_files(client, study.paths, apps=["hold"], headers={"X-Correlation-ID": f"scene-{number}"})
        settled = ["delivered"] * 2 + ["failed"] * 2 + ["pending"] * 2
        await _wait(
            client,
            "/v1/deliveries",
            lambda d: sorted(x["state"] for x in d["deliveries"]) == settled,
            "the deliveries to settle",
        )


@dataclass
class Scene:
    service: ThreadedService
    root: Path
    built_at: float

    @property
    def url(self) -> str:
        return self.service.url

    def app(self, **kwargs: Any) -> MwmApp:
        """The console on this scene: fixed address shown, frozen clock, normalised answers."""
        options: dict[str, Any] = {
            "display_url": DISPLAY_URL,
            "clock": frozen_clock(self.built_at + CLOCK_OFFSET),
            "client_factory": normalising_client(self.root),
            "feed_options": {"debounce": 0.02},
        }
        options.update(kwargs)
        return MwmApp(self.url, None, **options)


def tiny_study(out: Path, seed: int) -> Path:
    """One 16x16 instance in a study of its own (the seed makes its UIDs and patient)."""
    info = synthetic.generate_study(
        out / f"tiny-{seed:04d}", series_count=1, instances_per_series=1, rows=16, cols=16, seed=seed
    )
    return info.paths[0]
