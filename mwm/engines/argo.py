"""The Argo Workflows engine: each job attempt runs as a Workflow submitted to the Argo Server.

- Inputs and outputs travel through the S3 bucket mwm stores in: ``launch`` copies the job's
  instances server-side under ``jobs/<job>/<attempt>/input/``; the workflow's container gets them
  as an S3 input artifact and its output folder is uploaded under ``jobs/<job>/<attempt>/output/``,
  which ``collect`` downloads.
- The reference is ``{"namespace": ..., "name": ...}``. The name is deterministic
  (``<instance>-<job>-<attempt>``): a create re-sent after a lost answer, or after mwm stopped
  during a launch, meets ``409 AlreadyExists`` and adopts the workflow instead of running a twin.
- One watcher lists this mwm's unfinished workflows per namespace once per ``poll_interval``
  (a label selector and only the fields needed) and wakes the jobs waiting on them; a workflow
  that leaves that list is fetched once, to read how it ended. The Argo Server's load grows with
  time, not with the number of waiting jobs.
- Every request shares one aiohttp session and at most ``max_concurrent_requests`` run at once.
  Connection errors, 5xx and 429 are retried with exponential back-off; 401/403 are not (the
  token is wrong: retrying cannot help and would only hammer the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from ..errors import ConfigError, EngineError, MwmError, StorageError
from ..results import safe_segment
from ..storage import key as storage_key
from . import Engine, EngineStatus, JobContext
from .argo_workflow import (
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_INSTANCE,
    LABEL_JOB,
    RUNNING_PHASES,
    ArgoOptions,
    ArgoSettings,
    WorkflowRequest,
    active_selector,
    build_workflow,
    workflow_name,
    workflow_status,
)
from .local import failure_message, log_tail

log = logging.getLogger(__name__)

LIST_FIELDS = "metadata,items.metadata.name,items.status.phase"
GET_FIELDS = "metadata.name,metadata.labels,metadata.creationTimestamp,status.phase,status.message,status.nodes"
LIST_PAGE = 500
TOKEN_RECHECK = 1.0  # seconds between checks of the token file
WATCH_BACKOFF_MAX = 60.0
#: An unwatched entry is dropped after this many poll intervals (its job is gone or moved on).
STALE_INTERVALS = 12


class ArgoHttpError(EngineError):
    """The Argo Server answered a request with an error that is not retried (4xx but 401/403/429)."""

    def __init__(self, status: int, message: str, what: str) -> None:
        super().__init__(f"the Argo Server answered HTTP {status} to {what}", message, retryable=status >= 500)
        self.status = status


def parse_ref(ref: str) -> tuple[str, str]:
    """``(namespace, name)`` from an engine reference."""
    try:
        data = json.loads(ref)
        return str(data["namespace"]), str(data["name"])
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"not an Argo workflow reference: {ref[:200]!r}", retryable=False) from None


def _error_message(body: bytes) -> str:
    """The ``message`` of an Argo (grpc-gateway) error body, or the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace").strip()
    if isinstance(data, Mapping):
        return str(data.get("message") or data.get("error") or data)[:1000]
    return str(data)[:300]


def retry_delay(attempt: int, base: float, cap: float, retry_after: str | None = None) -> float:
    """Seconds before try ``attempt + 1``: exponential with jitter, at least a numeric ``Retry-After``."""
    delay: float = min(cap, base * 2.0 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.0)
    if retry_after and retry_after.strip().isdigit():
        delay = max(delay, min(cap, float(retry_after)))
    return delay


class TokenSource:
    """The bearer token: fixed, or read from a file again whenever the file changes."""

    def __init__(self, token: str | None, path: Path | None) -> None:
        self._token = _clean_token(token) if token else None
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -TOKEN_RECHECK

    async def current(self) -> str | None:
        if self._path is not None and time.monotonic() - self._checked >= TOKEN_RECHECK:
            await self.reload()
        return self._token

    async def reload(self) -> bool:
        """Read the file now if it changed; True when the token is a new one."""
        if self._path is None:
            return False
        path = self._path
        self._checked = time.monotonic()

        def read() -> tuple[tuple[int, int, int], str | None]:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return stamp, None
            return stamp, path.read_text(encoding="utf-8")

        try:
            stamp, text = await asyncio.to_thread(read)
        except OSError as exc:
            if self._token is not None:
                log.warning("cannot read the Argo token file %s (%s); using the last token read", path, exc)
                return False
            raise EngineError(f"cannot read the Argo token file {path}", str(exc), retryable=False) from exc
        self._stamp = stamp
        if text is None:
            return False
        token = _clean_token(text)
        changed = token != self._token
        self._token = token
        return changed


def _clean_token(text: str) -> str:
    token = text.strip()
    return token[len("Bearer ") :].strip() if token.startswith("Bearer ") else token


class ArgoApi:
    """The few Argo Server calls mwm makes, with retries, bounded concurrency and request counts."""

    def __init__(self, settings: ArgoSettings) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.token = TokenSource(settings.token, settings.token_file)
        self.counts: Counter[str] = Counter()
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_requests)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        settings = self.settings
        tls: ssl.SSLContext | bool = True
        if not settings.verify_tls:
            tls = False
        elif settings.ca_bundle is not None:
            bundle = settings.ca_bundle
            try:
                tls = await asyncio.to_thread(ssl.create_default_context, cafile=str(bundle))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"engines.argo.ca_bundle: cannot load {bundle}: {exc}") from exc
        connector = aiohttp.TCPConnector(limit=settings.max_concurrent_requests, ssl=tls)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=float(settings.request_timeout)),
            headers={"Accept": "application/json"},
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        limit: int | None = None,
    ) -> bytes:
        """The answer's body; raises ``EngineError`` (``ArgoHttpError`` for a 4xx worth acting on)."""
        if self._session is None:
            raise EngineError("the Argo engine is not open")
        settings = self.settings
        what = f"{method} {path}"
        last = ""
        for attempt in range(1, settings.request_attempts + 1):
            retry_after: str | None = None
            try:
                async with self._semaphore:
                    token = await self.token.current()
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    self.counts[kind] += 1
                    async with self._session.request(
                        method, self.url + path, params=params, json=body, headers=headers
                    ) as response:
                        status = response.status
                        retry_after = response.headers.get("Retry-After")
                        data = await _read(response, limit if status < 400 else 64 * 1024)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise EngineError(
                    f"the Argo Server's certificate was not accepted ({self.url})",
                    f"{exc}; set engines.argo.ca_bundle to the CA that signed it",
                    retryable=False,
                ) from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                last = f"cannot reach the Argo Server at {self.url}: {str(exc) or type(exc).__name__}"
            else:
                if status < 400:
                    return data
                message = _error_message(data)
                if status in (401, 403):
                    if attempt == 1 and await self.token.reload():
                        continue  # the token file was just rotated: once more with the new one
                    raise EngineError(
                        f"the Argo Server refused the token (HTTP {status}: {message})",
                        f"{what}; check engines.argo.token or token_file and the account's permissions",
                        retryable=False,
                    )
                if status != 429 and status < 500:
                    raise ArgoHttpError(status, message, what)
                last = f"the Argo Server answered HTTP {status} to {what}: {message}"
            if attempt < settings.request_attempts:
                await asyncio.sleep(
                    retry_delay(attempt, float(settings.retry_backoff), float(settings.retry_backoff_max), retry_after)
                )
        raise EngineError(last, f"after {settings.request_attempts} tries", retryable=True)

    async def json(self, method: str, path: str, *, kind: str, **kwargs: Any) -> Any:
        data = await self.request(method, path, kind=kind, **kwargs)
        try:
            return json.loads(data)
        except ValueError:
            raise EngineError(f"the Argo Server answered {method} {path} with something that is not JSON") from None

    # -- the calls ------------------------------------------------------------------------------

    async def create(self, namespace: str, workflow: Mapping[str, Any]) -> Any:
        body = {"namespace": namespace, "workflow": workflow}
        return await self.json("POST", f"/api/v1/workflows/{namespace}", kind="submit", body=body)

    async def get(self, namespace: str, name: str, fields: str = GET_FIELDS) -> Any:
        return await self.json("GET", f"/api/v1/workflows/{namespace}/{name}", kind="get", params={"fields": fields})

    async def list(self, namespace: str, selector: str, fields: str = LIST_FIELDS) -> list[Any]:
        items: list[Any] = []
        params = {"listOptions.labelSelector": selector, "listOptions.limit": str(LIST_PAGE), "fields": fields}
        while True:
            page = await self.json("GET", f"/api/v1/workflows/{namespace}", kind="list", params=params)
            items.extend(page.get("items") or ())  # Go's empty list is null
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params = {**params, "listOptions.continue": token}

    async def terminate(self, namespace: str, name: str) -> None:
        body = {"namespace": namespace, "name": name}
        await self.request("PUT", f"/api/v1/workflows/{namespace}/{name}/terminate", kind="terminate", body=body)

    async def delete(self, namespace: str, name: str) -> None:
        await self.request("DELETE", f"/api/v1/workflows/{namespace}/{name}", kind="delete")

    async def logs(self, namespace: str, name: str, limit: int) -> str:
        """The main containers' logs of the workflow's pods (as much as ``limit`` bytes)."""
        params = {"logOptions.container": CONTAINER, "logOptions.limitBytes": str(limit)}
        data = await self.request(
            "GET", f"/api/v1/workflows/{namespace}/{name}/log", kind="log", params=params, limit=limit * 2
        )
        lines = []
        for line in data.splitlines():  # one JSON object per line: {"result": {"content", "podName"}}
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            result = entry.get("result") if isinstance(entry, Mapping) else None
            if isinstance(result, Mapping) and "content" in result:
                lines.append(str(result["content"]))
        return "\n".join(lines)


async def _read(response: aiohttp.ClientResponse, limit: int | None) -> bytes:
    if limit is None:
        return await response.read()
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


# -- the shared watcher --------------------------------------------------------------------------


@dataclass(eq=False)
class Tracked:
    """A workflow some job is waiting on, and what the watcher last learnt of it."""

    namespace: str
    name: str
    status: EngineStatus | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0
    wanted_at: float = field(default_factory=time.monotonic)
    logs_fetched: bool = False

    def update(self, status: EngineStatus) -> None:
        if status != self.status:
            self.status = status
            self.changed.set()
            self.changed = asyncio.Event()


class WorkflowWatcher:
    """One loop that refreshes every tracked workflow per interval with one list per namespace."""

    def __init__(self, api: ArgoApi, settings: ArgoSettings) -> None:
        self.api = api
        self.settings = settings
        self.interval = float(settings.poll_interval)
        self.selector = active_selector(settings.instance)
        self._tracked: dict[tuple[str, str], Tracked] = {}
        self._work = asyncio.Event()
        self._failures = 0
        self.rounds = 0

    def track(self, namespace: str, name: str) -> Tracked:
        entry = self._tracked.get((namespace, name))
        if entry is None:
            entry = self._tracked[(namespace, name)] = Tracked(namespace, name)
            self._work.set()
        entry.wanted_at = time.monotonic()
        return entry

    def forget(self, namespace: str, name: str) -> None:
        self._tracked.pop((namespace, name), None)

    def __len__(self) -> int:
        return len(self._tracked)

    async def run(self) -> None:
        while True:
            await self._work.wait()
            started = time.monotonic()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except EngineError as exc:
                self._failures += 1
                level = logging.WARNING if self._failures < 3 or self._failures % 10 == 0 else logging.DEBUG
                log.log(
                    level, "cannot poll Argo workflows (%d in a row): %s (%s)", self._failures, exc.message, exc.detail
                )
            except Exception:
                self._failures += 1
                log.exception("polling Argo workflows failed")
            else:
                self._failures = 0
            self._drop_stale()
            if not self._tracked:
                self._work.clear()
            pause = self.interval
            if self._failures:
                pause = min(WATCH_BACKOFF_MAX, self.interval * 2 ** min(self._failures - 1, 10))
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))

    def _drop_stale(self) -> None:
        horizon = time.monotonic() - max(60.0, STALE_INTERVALS * self.interval)
        for key, entry in list(self._tracked.items()):
            if entry.waiters == 0 and entry.wanted_at < horizon:
                del self._tracked[key]

    async def refresh(self) -> None:
        """One round: a list per namespace, then a get for each workflow that left the list."""
        self.rounds += 1
        by_namespace: dict[str, list[Tracked]] = defaultdict(list)
        for entry in list(self._tracked.values()):
            if entry.status is None or not entry.status.finished:
                by_namespace[entry.namespace].append(entry)
        for namespace, entries in by_namespace.items():
            items = await self.api.list(namespace, self.selector)
            phases = {
                (item.get("metadata") or {}).get("name"): (item.get("status") or {}).get("phase") or ""
                for item in items
            }
            gone = []
            for entry in entries:
                phase = phases.get(entry.name)
                if phase is not None and phase in RUNNING_PHASES:
                    entry.update(EngineStatus("running", message=phase or "Pending"))
                else:
                    gone.append(entry)  # finished, deleted, or not listed yet: ask for it by name
            results = await asyncio.gather(*(self.fetch(e) for e in gone), return_exceptions=True)
            for entry, result in zip(gone, results, strict=True):
                if isinstance(result, EngineError):
                    log.warning("cannot read Argo workflow %s/%s: %s", entry.namespace, entry.name, result.message)
                elif isinstance(result, BaseException):
                    raise result

    async def fetch(self, entry: Tracked) -> None:
        entry.update(await fetch_status(self.api, entry.namespace, entry.name))


async def fetch_status(api: ArgoApi, namespace: str, name: str) -> EngineStatus:
    try:
        workflow = await api.get(namespace, name)
    except ArgoHttpError as exc:
        if exc.status == 404:
            return EngineStatus(
                "failed", message=f"workflow {name} no longer exists on the Argo Server (namespace {namespace})"
            )
        raise
    return workflow_status(workflow)


# -- the engine ----------------------------------------------------------------------------------


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class ArgoEngine(Engine):
    """Runs each job attempt as an Argo Workflow, with the job's files in S3."""

    name = "argo"
    Options = ArgoOptions
    EngineSettings = ArgoSettings

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        settings: ArgoSettings = self.engine_settings
        if getattr(self.storage, "kind", None) != "s3" or not hasattr(self.storage, "copy"):
            raise ConfigError(
                'engines.argo: the Argo engine needs [storage] kind = "s3" (the cluster reads the inputs and '
                f"writes the outputs in the same bucket); the storage kind is {self.storage.kind!r}"
            )
        self.argo_settings = settings
        self.poll_interval = float(settings.poll_interval)  # type: ignore[misc]
        self.api = ArgoApi(settings)
        self.watcher = WorkflowWatcher(self.api, settings)
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def s3(self) -> Any:
        """The S3 storage (``copy``, ``object_key``, ``delete_prefix``, ``fetch_listed``)."""
        return self.storage

    async def open(self) -> None:
        await self.api.open()
        self._watch_task = asyncio.create_task(self.watcher.run(), name="argo-watcher")

    async def close(self) -> None:
        """Stop watching; running workflows go on and are found again after a restart."""
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.api.close()

    # -- launching ------------------------------------------------------------------------------

    @staticmethod
    def job_prefix(ctx: JobContext) -> str:
        return storage_key("jobs", str(ctx.job_id), str(ctx.attempt))

    def namespace_of(self, ctx: JobContext) -> str:
        options: ArgoOptions = ctx.options
        return options.namespace or self.argo_settings.namespace

    async def launch(self, ctx: JobContext) -> str:
        settings = self.argo_settings
        namespace = self.namespace_of(ctx)
        name = workflow_name(settings.instance, ctx.job_id, ctx.attempt)
        prefix = self.job_prefix(ctx)
        try:
            # Outputs an interrupted earlier launch of this attempt may have left must not be collected.
            await self.s3.delete_prefix(f"{prefix}/output")
            await self._stage(ctx, prefix)
        except StorageError as exc:
            raise EngineError(f"cannot stage the job's inputs in S3: {exc.message}", exc.detail) from exc
        request = WorkflowRequest(
            name=name,
            namespace=namespace,
            job_id=ctx.job_id,
            attempt=ctx.attempt,
            app_id=ctx.app.id,
            app_version=ctx.app.version,
            correlation_id=ctx.correlation_id,
            run_timeout=ctx.run_timeout,
            bucket=self.s3.bucket,
            input_key=self.s3.object_key(f"{prefix}/input"),
            output_key=self.s3.object_key(f"{prefix}/output"),
        )
        manifest = build_workflow(request, settings, ctx.options)
        started = time.time()
        await self._submit(ctx, namespace, name, manifest, started)
        await self._log(
            ctx,
            f"--- attempt {ctx.attempt} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: "
            f"Argo workflow {namespace}/{name} on {settings.url}\n",
        )
        log.info(
            "job %s submitted as Argo workflow %s/%s",
            ctx.job_id,
            namespace,
            name,
            extra={"job_id": ctx.job_id, "app_id": ctx.app.id, "correlation_id": ctx.correlation_id},
        )
        self.watcher.track(namespace, name)
        return json.dumps({"namespace": namespace, "name": name})

    async def _stage(self, ctx: JobContext, prefix: str) -> None:
        """Server-side copies of the job's instances under ``<prefix>/input/``."""
        semaphore = asyncio.Semaphore(self.argo_settings.staging_concurrency)

        async def one(source: str, target: str) -> None:
            async with semaphore:
                await self.s3.copy(source, target)

        try:
            async with asyncio.TaskGroup() as tg:
                for item in ctx.inputs:
                    tg.create_task(one(item.storage_key, storage_key(prefix, "input", f"{item.sop_instance_uid}.dcm")))
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _submit(
        self, ctx: JobContext, namespace: str, name: str, manifest: Mapping[str, Any], started: float
    ) -> None:
        for _ in range(3):
            try:
                await self.api.create(namespace, manifest)
                return
            except ArgoHttpError as exc:
                if exc.status != 409:
                    raise EngineError(
                        f"the Argo Server rejected workflow {namespace}/{name}: {exc.detail}",
                        f"HTTP {exc.status}",
                        retryable=exc.retryable,
                    ) from exc
            if await self._adopt(ctx, namespace, name, started):
                return
        raise EngineError(f"workflow {namespace}/{name} exists and could not be replaced", retryable=True)

    async def _adopt(self, ctx: JobContext, namespace: str, name: str, started: float) -> bool:
        """After 409: True to adopt the existing workflow, False once a stale one has been deleted."""
        try:
            existing = await self.api.get(namespace, name)
        except ArgoHttpError as exc:
            if exc.status == 404:
                return False  # deleted meanwhile: create again
            raise
        metadata = existing.get("metadata") or {}
        found = metadata.get("labels") or {}
        expected = {
            LABEL_INSTANCE: self.argo_settings.instance,
            LABEL_JOB: str(ctx.job_id),
            LABEL_ATTEMPT: str(ctx.attempt),
        }
        if any(found.get(k) != v for k, v in expected.items()):
            raise EngineError(
                f"a workflow named {namespace}/{name} exists that mwm did not make for this job",
                "give this mwm its own engines.argo.instance",
                retryable=False,
            )
        status = workflow_status(existing)
        created = _timestamp(metadata.get("creationTimestamp"))
        if status.finished and created is not None and created < started - 1.0:
            # Left by an earlier round of this job (a retry starts counting attempts again):
            # its outputs are gone with its cleanup, so run it afresh.
            log.info("deleting stale workflow %s/%s before running job %s again", namespace, name, ctx.job_id)
            with contextlib.suppress(ArgoHttpError):
                await self.api.delete(namespace, name)
            await asyncio.sleep(min(1.0, float(self.argo_settings.retry_backoff)))
            return False
        log.info("adopting existing workflow %s/%s for job %s", namespace, name, ctx.job_id)
        return True

    async def abandon(self, ctx: JobContext) -> None:
        """Nothing to do: the next launch of the same attempt adopts the workflow by its name."""

    # -- watching -------------------------------------------------------------------------------

    async def poll(self, ctx: JobContext, ref: str) -> EngineStatus:
        namespace, name = parse_ref(ref)
        status = await fetch_status(self.api, namespace, name)
        entry = self.watcher.track(namespace, name)
        entry.update(status)
        if status.finished:
            status = await self._finished(ctx, entry, status)
        return status

    async def wait(self, ctx: JobContext, ref: str, timeout: float) -> EngineStatus:
        namespace, name = parse_ref(ref)
        entry = self.watcher.track(namespace, name)
        if entry.status is None or not entry.status.finished:
            changed = entry.changed
            entry.waiters += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout)
            finally:
                entry.waiters -= 1
                entry.wanted_at = time.monotonic()
        status = entry.status or EngineStatus("running", message="Pending")
        if status.finished:
            status = await self._finished(ctx, entry, status)
        return status

    async def _finished(self, ctx: JobContext, entry: Tracked, status: EngineStatus) -> EngineStatus:
        """Fetch the logs once; a failure's message ends with the log's tail, as the local engine's does."""
        if entry.logs_fetched:
            return status
        await self._fetch_logs(ctx, entry.namespace, entry.name)
        entry.logs_fetched = True
        if status.state == "failed":
            tail = await asyncio.to_thread(log_tail, ctx.log_path)
            if tail:
                message = failure_message(status.message or "failed", tail)
                status = EngineStatus("failed", message=message, exit_code=status.exit_code)
            entry.status = status
        return status

    async def _fetch_logs(self, ctx: JobContext, namespace: str, name: str) -> None:
        try:
            text = await self.api.logs(namespace, name, self.argo_settings.log_limit_bytes)
        except EngineError as exc:
            await self._log(ctx, f"--- the logs of workflow {namespace}/{name} could not be read: {exc.message}\n")
            return
        if text:
            await self._log(ctx, text if text.endswith("\n") else text + "\n")

    async def _log(self, ctx: JobContext, text: str) -> None:
        def append() -> None:
            ctx.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(ctx.log_path, "a", encoding="utf-8") as f:
                f.write(text)

        try:
            await asyncio.to_thread(append)
        except OSError as exc:
            log.warning("job %s: cannot write its log: %s", ctx.job_id, exc)

    # -- stopping, collecting, cleaning up ------------------------------------------------------

    async def cancel(self, ctx: JobContext, ref: str) -> None:
        namespace, name = parse_ref(ref)
        try:
            await self.api.terminate(namespace, name)
        except ArgoHttpError as exc:
            if exc.status != 404:
                raise
        else:
            log.info("Argo workflow %s/%s terminated (job %s)", namespace, name, ctx.job_id)
            entry = self.watcher.track(namespace, name)
            if not entry.logs_fetched:
                entry.logs_fetched = True
                await self._fetch_logs(ctx, namespace, name)
        self.watcher.forget(namespace, name)

    async def collect(self, ctx: JobContext, ref: str) -> Path:
        prefix = f"{self.job_prefix(ctx)}/output"
        out = ctx.output_dir

        def reset() -> None:
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)

        await asyncio.to_thread(reset)
        try:
            keys = await self.s3.list(prefix)
            for found in keys:
                relative = found[len(prefix) + 1 :] if found.startswith(prefix + "/") else "output"
                # Argo wrote these names for the application: each segment is made safe as a path.
                target = out.joinpath(*(safe_segment(part) for part in relative.split("/") if part))
                await self.s3.fetch_listed(found, target)
        except StorageError as exc:
            raise EngineError(f"cannot collect the outputs from S3: {exc.message}", exc.detail) from exc
        return out

    async def cleanup(self, ctx: JobContext, ref: str) -> None:
        """Delete the workflow (when ``delete_finished``) and the job's staged objects; failures are logged."""
        namespace, name = parse_ref(ref)
        self.watcher.forget(namespace, name)
        if self.argo_settings.delete_finished:
            try:
                await self.api.delete(namespace, name)
            except ArgoHttpError as exc:
                if exc.status != 404:
                    log.warning("cannot delete Argo workflow %s/%s: %s", namespace, name, exc.detail)
            except EngineError as exc:
                log.warning(
                    "cannot delete Argo workflow %s/%s: %s (its ttlStrategy will)", namespace, name, exc.message
                )
        try:
            await self.s3.delete_prefix(self.job_prefix(ctx))
        except MwmError as exc:
            log.warning("job %s: cannot delete its staged objects: %s", ctx.job_id, exc.message)


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch of a Kubernetes time (``2024-05-01T12:00:00Z``)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
