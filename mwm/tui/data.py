"""The console's side of the HTTP API: fetching, the event stream, polling and reconnection.

No Textual here. A :class:`Feed` runs a few small loops in the caller's event loop and reports to a
:class:`FeedListener`:

- the *refresh* loop fetches whatever is marked stale ("topics"), coalescing bursts of changes
  (debounce), and goes into back-off when mwm cannot be reached;
- the *stream* loop follows ``/v1/events/stream`` and marks topics stale from each event's kind,
  resuming after the last event it saw (``Last-Event-ID``);
- the *poll* loop marks everything stale every ``poll_interval`` while the stream is down, and
  what no event announces (instances arriving in an open bucket, storage use) every
  ``live_interval`` while it is up;
- the *follow* loop re-reads the log of the watched job every second while that job runs.

Every request has a timeout, so a slow network delays data, never the screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp

from ..client import Client, ClientError
from .fmt import ACTIVE_JOB_STATES, clip

log = logging.getLogger(__name__)

Clock = Callable[[], float]
ClientFactory = Callable[[str, str | None], Client]
Role = Literal["admin", "read"]
LinkState = Literal["connecting", "live", "polling", "down"]

STATS, BUCKETS, JOBS, APPS, SINKS, DELIVERIES, JOB, LOG = (
    "stats",
    "buckets",
    "jobs",
    "apps",
    "sinks",
    "deliveries",
    "job",
    "log",
)
#: What the screens show; ``job`` and ``log`` are about the watched job only.
LIST_TOPICS = frozenset({STATS, BUCKETS, JOBS, APPS, SINKS, DELIVERIES})
ALL_TOPICS = LIST_TOPICS | {JOB, LOG}
STREAM_PATH = "/v1/events/stream"
#: mwm writes a comment line every 15 s on an idle stream; three missed ones mean it is gone.
STREAM_IDLE_TIMEOUT = 45.0
#: Seconds after a bucket opens to fetch it again (with the instances that arrived since).
BURST_FOLLOW_UP = 1.5


def backoff_delay(failures: int, *, base: float = 1.0, cap: float = 10.0) -> float:
    """Seconds to wait after ``failures`` consecutive failures: 1, 2, 4, 8 … capped."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (failures - 1)))


def topics_for_event(kind: str) -> frozenset[str]:
    """Which lists an event of ``kind`` makes stale."""
    area = kind.partition(".")[0]
    if area == "bucket":
        return frozenset({BUCKETS, STATS})
    if kind == "job.scheduled":  # a bucket closed into a job
        return frozenset({BUCKETS, JOBS, STATS})
    if area == "job":
        return frozenset({JOBS, STATS})
    if area == "delivery":
        return frozenset({STATS, SINKS, DELIVERIES})
    if area == "app":
        return frozenset({APPS, STATS})
    return frozenset({STATS})


def short_reason(detail: str | None) -> str:
    """Why a connection failed, in a few words (aiohttp's messages name the address and port)."""
    if not detail:
        return "no answer"
    lowered = detail.lower()
    for needle, reason in (
        ("connect call failed", "connection refused"),
        ("connection refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("temporary failure in name resolution", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("network is unreachable", "network unreachable"),
        ("no route to host", "no route to host"),
        ("certificate", "TLS certificate rejected"),
        ("server disconnected", "connection closed"),
        ("connection reset", "connection reset"),
        ("timeout", "timed out"),
    ):
        if needle in lowered:
            return reason
    first = detail.splitlines()[0]
    if first.endswith("]") and "[" in first:  # "Cannot connect to host H:P ssl:default [reason]"
        first = first[first.rindex("[") + 1 : -1]
    return first[:80]


#: An ``Authorization`` value written into a message, whatever the token (``Bearer abc…``).
BEARER_VALUE = re.compile(r"(?i)\b(bearer)\s+[^\s'\",;)}\]]+")
REDACTED = "***"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each secret, and any bearer value, replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return BEARER_VALUE.sub(rf"\1 {REDACTED}", text)


def describe_error(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """An unexpected failure in one line for the banner: its kind and first line, secrets blanked.

    Of a group of exceptions (a task group's), the first one. The addresses aiohttp refuses are
    described without the address: the top bar shows it already.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, aiohttp.NonHttpUrlClientError):
        return "the address must start with http:// or https://"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid address"
    if isinstance(exc, ClientError):  # its message is meant to be read
        text = f"{exc.message}: {exc.detail}" if exc.detail else exc.message
    else:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return clip(redact(text, secrets), 100)


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: ``event`` is the kind, ``data`` the joined data lines."""

    id: str | None
    event: str
    data: str


class SseParser:
    """An incremental ``text/event-stream`` parser (the WHATWG rules, minus what mwm never sends)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, line: str) -> SseEvent | None:
        """Take one line (with or without its end of line); the event it completes, if any."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self.last_id, self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


@dataclass(frozen=True)
class LinkStatus:
    """How the console is connected: ``live`` (event stream), ``polling`` (no stream), ``down``."""

    state: LinkState
    retry_at: float | None = None  # on the app's clock, while down
    error: str | None = None
    unauthorized: bool = False


@dataclass
class Update:
    """What one refresh fetched; ``None`` means "not fetched this time", not "empty"."""

    stats: dict[str, Any] | None = None
    buckets: list[dict[str, Any]] | None = None
    jobs: list[dict[str, Any]] | None = None
    apps: list[dict[str, Any]] | None = None
    sinks: list[dict[str, Any]] | None = None
    deliveries: list[dict[str, Any]] | None = None
    job_id: int | None = None
    job: dict[str, Any] | None = None
    log: str | None = None
    #: Topics whose request was answered with an error (the message), other than unreachability.
    errors: dict[str, str] = field(default_factory=dict)
    fetched_at: float = 0.0


class FeedListener(Protocol):
    """What a :class:`Feed` reports to. Called in the feed's event loop; must not block."""

    def feed_update(self, update: Update) -> None: ...

    def feed_link(self, status: LinkStatus) -> None: ...

    def feed_event(self, event: dict[str, Any]) -> None: ...

    def feed_role(self, role: Role | None) -> None: ...


class Unreachable(Exception):
    """mwm did not answer (connection refused, timeout), or refused the token."""

    def __init__(self, message: str, *, unauthorized: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.unauthorized = unauthorized


class StreamUnavailable(Exception):
    """The event stream answered, but not with a stream."""


class Feed:
    """Keeps a listener up to date with a running mwm. ``await feed.run()`` until cancelled."""

    def __init__(
        self,
        url: str,
        token: str | None,
        listener: FeedListener,
        *,
        clock: Clock = time.time,
        client_factory: ClientFactory = Client,
        poll_interval: float = 2.0,
        live_interval: float = 5.0,
        slow_interval: float = 30.0,
        follow_interval: float = 1.0,
        debounce: float = 0.25,
        request_timeout: float = 8.0,
        backoff_base: float = 1.0,
        max_backoff: float = 10.0,
        jobs_limit: int = 1000,
        buckets_limit: int = 2000,
        deliveries_limit: int = 200,
        log_tail: int = 200,
        stream_path: str = STREAM_PATH,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.listener = listener
        self.clock = clock
        self.client_factory = client_factory
        self.poll_interval = poll_interval
        self.live_interval = live_interval
        self.slow_interval = slow_interval
        self.follow_interval = follow_interval
        self.debounce = debounce
        self.request_timeout = request_timeout
        self.backoff_base = backoff_base
        self.max_backoff = max_backoff
        self.jobs_limit = jobs_limit
        self.buckets_limit = buckets_limit
        self.deliveries_limit = deliveries_limit
        self.log_tail = log_tail
        self.stream_path = stream_path
        self.role: Role | None = None
        self.status = LinkStatus("connecting")
        self.last_event_id: str | None = None
        self._client: Client | None = None
        self._dirty: set[str] = set(ALL_TOPICS)
        self._dirty_event = asyncio.Event()
        self._dirty_event.set()
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._streaming = False
        self._failures = 0
        self._watched: int | None = None
        self._watched_active = False
        self._role_task: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None

    # -- what the screens ask for -----------------------------------------------------------

    def watch_job(self, job_id: int | None) -> None:
        """Fetch this job's details and log from now on (``None``: no job)."""
        if job_id == self._watched:
            return
        self._watched = job_id
        self._watched_active = job_id is not None
        if job_id is not None:
            self.invalidate(JOB, LOG)

    def invalidate(self, *topics: str) -> None:
        """Mark topics stale; the refresh loop fetches them after the debounce delay."""
        self._dirty.update(topics or ALL_TOPICS)
        self._dirty_event.set()

    def reconnect_now(self) -> None:
        """Cut the back-off short and refresh everything."""
        self.invalidate()
        self._wake.set()

    async def post(self, path: str) -> Any:
        """An action (``POST``); raises :class:`ClientError` (with ``status``) or :class:`Unreachable`."""
        client = self._require_client()
        try:
            async with asyncio.timeout(self.request_timeout):
                answer = await client.post(path)
        except TimeoutError:
            raise Unreachable(f"no answer from mwm within {self.request_timeout:g} s") from None
        except ClientError as exc:
            if exc.status is None:
                raise Unreachable(redact(short_reason(exc.detail or exc.message), (self.token,))) from None
            if exc.status == 403 and self.role != "read":
                self.role = "read"
                self.listener.feed_role("read")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the client is reported the same way
            raise Unreachable(self.describe(exc)) from None
        self.invalidate(*LIST_TOPICS, JOB, LOG)
        return answer

    def describe(self, exc: BaseException) -> str:
        """``exc`` in one line, without the token."""
        return describe_error(exc, (self.token,))

    # -- the loops ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled. What the loops do not expect (a client that cannot be made, a bug)
        stops them all: it is reported like an unreachable mwm, and they start again after the
        back-off, with a new client."""
        while True:
            try:
                await self._run_loops()
            except Exception as exc:  # noqa: BLE001 - the console goes on showing mwm whatever went wrong
                reason = self.describe(exc)
                log.debug("the console's loops stopped: %s", reason)
                self._streaming = False
                self._role_task = None
                await self._back_off(Unreachable(reason))
                self._dirty |= ALL_TOPICS
                self._dirty_event.set()

    async def _run_loops(self) -> None:
        async with self.client_factory(self.url, self.token) as client:
            self._client = client
            try:
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    tasks.create_task(self._refresh_loop(), name="tui-refresh")
                    tasks.create_task(self._stream_loop(), name="tui-stream")
                    tasks.create_task(self._poll_loop(), name="tui-poll")
                    tasks.create_task(self._follow_loop(), name="tui-follow")
            finally:
                self._client = self._tasks = None

    async def _refresh_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            if self.debounce > 0 and self._up.is_set():
                await asyncio.sleep(self.debounce)
            topics, self._dirty = self._dirty, set()
            self._dirty_event.clear()
            try:
                update = await self._fetch(topics)
            except Unreachable as exc:
                self._dirty |= topics
                await self._back_off(exc)
                self._dirty |= ALL_TOPICS
                self._dirty_event.set()
                continue
            self._failures = 0
            if not self._up.is_set():
                self._up.set()
                self._set_link(LinkStatus("live" if self._streaming else "polling"))
                if self.role is None and self._role_task is None and self._tasks is not None:
                    self._role_task = self._tasks.create_task(self._detect_role(), name="tui-role")
            self.listener.feed_update(update)

    async def _back_off(self, exc: Unreachable) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures, base=self.backoff_base, cap=self.max_backoff)
        self._up.clear()
        self._set_link(
            LinkStatus("down", retry_at=self.clock() + delay, error=exc.message, unauthorized=exc.unauthorized)
        )
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _stream_loop(self) -> None:
        failures = 0
        while True:
            await self._up.wait()
            try:
                await self._follow_stream()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the lists are polled whatever ended the stream
                failures += 1
                log.debug("event stream: %s", self.describe(exc))
            if self._streaming:
                self._streaming = False
                if self._up.is_set():
                    self._set_link(LinkStatus("polling"))
                # Whatever ended the stream may have ended mwm: find out now, not at the next poll.
                self.invalidate(STATS)
            await asyncio.sleep(max(1.0, backoff_delay(failures, cap=30.0)))

    async def _follow_stream(self) -> None:
        client = self._require_client()
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout, sock_read=STREAM_IDLE_TIMEOUT)
        async with client.session.get(client.url + self.stream_path, headers=headers, timeout=timeout) as response:
            if response.status != 200 or response.content_type != "text/event-stream":
                raise StreamUnavailable(f"HTTP {response.status} {response.content_type}")
            self._streaming = True
            if self._up.is_set():
                self._set_link(LinkStatus("live"))
            # Anything may have happened between the last fetch and the stream's start.
            self.invalidate(*LIST_TOPICS, JOB)
            parser = SseParser()
            async for raw in response.content:
                event = parser.feed(raw.decode("utf-8", "replace"))
                if event is None:
                    continue
                if event.id is not None:
                    self.last_event_id = event.id
                self._on_event(event)

    def _on_event(self, event: SseEvent) -> None:
        try:
            data = json.loads(event.data)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        kind = str(data.get("kind") or event.event)
        topics = set(topics_for_event(kind))
        if kind == "bucket.opened":
            # The rest of the study usually follows at once, and arrivals have no event of their
            # own: look again when the burst is likely over, not only at the next slow poll.
            asyncio.get_running_loop().call_later(BURST_FOLLOW_UP, self.invalidate, BUCKETS, STATS)
        job_id = data.get("job_id")
        if job_id is not None and job_id == self._watched:
            topics |= {JOB, LOG}
        self.invalidate(*topics)
        self.listener.feed_event(data)

    async def _poll_loop(self) -> None:
        since_slow = 0.0
        while True:
            interval = self.live_interval if self._streaming else self.poll_interval
            await asyncio.sleep(interval)
            if not self._up.is_set():
                continue  # the refresh loop is backing off; it retries by itself
            if not self._streaming:
                self.invalidate(*LIST_TOPICS, JOB)
                continue
            # Instances arriving in an open bucket and storage use have no event of their own.
            since_slow += interval
            if since_slow >= self.slow_interval:
                since_slow = 0.0
                self.invalidate(*LIST_TOPICS)
            else:
                self.invalidate(STATS, BUCKETS)

    async def _follow_loop(self) -> None:
        while True:
            await asyncio.sleep(self.follow_interval)
            if self._watched is not None and self._watched_active and self._up.is_set():
                self.invalidate(LOG)

    # -- fetching ----------------------------------------------------------------------------

    def _require_client(self) -> Client:
        if self._client is None:
            raise Unreachable("not connected yet")
        return self._client

    async def _request(self, path: str, *, text: bool = False, **params: Any) -> Any:
        client = self._require_client()
        try:
            async with asyncio.timeout(self.request_timeout):
                if text:
                    query = {k: v for k, v in params.items() if v is not None}
                    body = await client.request("GET", path, params=query, expect_json=False)
                    return bytes(body).decode("utf-8", "replace")
                return await client.get(path, **params)
        except TimeoutError:
            raise Unreachable(f"no answer within {self.request_timeout:g} s") from None
        except ClientError as exc:
            if exc.status is None:
                raise Unreachable(redact(short_reason(exc.detail or exc.message), (self.token,))) from None
            if exc.status == 401:
                raise Unreachable("the token was refused (HTTP 401)", unauthorized=True) from None
            raise
        except Exception as exc:  # noqa: BLE001 - the client's own failures: an address aiohttp refuses, a bug
            raise Unreachable(self.describe(exc)) from None

    async def _fetch(self, topics: Iterable[str]) -> Update:
        wanted = sorted(set(topics))
        watched = self._watched
        if watched is None:
            wanted = [t for t in wanted if t not in (JOB, LOG)]
        answers = await asyncio.gather(*(self._fetch_topic(t, watched) for t in wanted), return_exceptions=True)
        update = Update(job_id=watched, fetched_at=self.clock())
        for topic, answer in zip(wanted, answers, strict=True):
            if isinstance(answer, Unreachable):
                raise answer
            if isinstance(answer, ClientError):
                if topic == JOB and answer.status == 404:
                    update.job = {}
                    continue
                update.errors[topic] = answer.message
                continue
            if isinstance(answer, Exception):  # an answer not as expected (no list in it)
                raise Unreachable(f"unexpected answer to {topic}: {self.describe(answer)}")
            if isinstance(answer, BaseException):
                raise answer
            setattr(update, topic, answer)
        if update.job and watched == self._watched:
            self._watched_active = update.job.get("state") in ACTIVE_JOB_STATES
        return update

    async def _fetch_topic(self, topic: str, watched: int | None) -> Any:
        if topic == STATS:
            return await self._request("/v1/stats")
        if topic == BUCKETS:
            return (await self._request("/v1/buckets", state="open", limit=self.buckets_limit))["buckets"]
        if topic == JOBS:
            return (await self._request("/v1/jobs", limit=self.jobs_limit))["jobs"]
        if topic == APPS:
            return (await self._request("/v1/apps"))["apps"]
        if topic == SINKS:
            return (await self._request("/v1/sinks"))["sinks"]
        if topic == DELIVERIES:
            failed, pending = await asyncio.gather(
                self._request("/v1/deliveries", state="failed", limit=self.deliveries_limit),
                self._request("/v1/deliveries", state="pending", limit=self.deliveries_limit),
            )
            rows = failed["deliveries"] + pending["deliveries"]
            return sorted(rows, key=lambda d: -int(d["id"]))
        if topic == JOB:
            return await self._request(f"/v1/jobs/{watched}")
        if topic == LOG:
            return await self._request(f"/v1/jobs/{watched}/log", text=True, tail=self.log_tail)
        raise ValueError(f"unknown topic {topic!r}")

    async def _detect_role(self) -> None:
        """Ask ``/v1/whoami``; without it, probe with a request that can change nothing.

        ``POST /v1/jobs/-/cancel`` names no job (ids are numbers), so an admin token gets 404 and
        a read-only token 403 (roles are checked before the route's handler runs).
        """
        role: Role | None = None
        try:
            answer = await self._request("/v1/whoami")
            if isinstance(answer, dict) and answer.get("role") in ("admin", "read"):
                role = answer["role"]
        except ClientError as exc:
            if exc.status != 404:
                return
        except Unreachable:
            self._role_task = None
            return
        if role is None:
            client = self._require_client()
            try:
                async with asyncio.timeout(self.request_timeout):
                    await client.post("/v1/jobs/-/cancel")
                role = "admin"
            except ClientError as exc:
                role = "read" if exc.status == 403 else "admin" if exc.status in (404, 405, 409) else None
            except Exception:  # noqa: BLE001 - a timeout or anything else: the role stays unknown
                role = None
        if role is None:
            self._role_task = None
            return
        self.role = role
        self.listener.feed_role(role)

    def _set_link(self, status: LinkStatus) -> None:
        if status != self.status:
            self.status = status
            self.listener.feed_link(status)


class Store:
    """The latest answer of each topic, merged from :class:`Update` objects."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None
        self.buckets: list[dict[str, Any]] | None = None
        self.jobs: list[dict[str, Any]] | None = None
        self.apps: list[dict[str, Any]] | None = None
        self.sinks: list[dict[str, Any]] | None = None
        self.deliveries: list[dict[str, Any]] | None = None
        self.job_id: int | None = None
        self.job: dict[str, Any] | None = None
        self.log: str | None = None
        self.errors: dict[str, str] = {}
        self.fetched_at: float | None = None

    def watch(self, job_id: int | None) -> None:
        """Show another job: forget the previous one's details until the new ones arrive."""
        if job_id != self.job_id:
            self.job_id, self.job, self.log = job_id, None, None

    def merge(self, update: Update) -> set[str]:
        """Take what ``update`` fetched; the topics that changed.

        Details fetched for another job than the one now watched (the selection moved while the
        request ran) are dropped.
        """
        changed: set[str] = set()
        for topic in (STATS, BUCKETS, JOBS, APPS, SINKS, DELIVERIES):
            value = getattr(update, topic)
            if value is not None and value != getattr(self, topic):
                setattr(self, topic, value)
                changed.add(topic)
        if update.job_id is not None and update.job_id == self.job_id:
            if update.job is not None and update.job != self.job:
                self.job = update.job
                changed.add(JOB)
            if update.log is not None and update.log != self.log:
                self.log = update.log
                changed.add(LOG)
        fetched = {t for t in ALL_TOPICS if getattr(update, t, None) is not None}
        self.errors = {k: v for k, v in self.errors.items() if k not in fetched} | update.errors
        self.fetched_at = update.fetched_at
        return changed
