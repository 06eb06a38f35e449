"""The HTTP API: upload (the File API), management and monitoring, JSON under ``/v1/``.

Handlers are thin: they parse, call the service's components and shape JSON. Errors are
``MwmError`` subclasses mapped to JSON in one place (``error_middleware``), never a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .db import DELIVERY_STATES, JOB_STATES
from .errors import BadRequest, Forbidden, MwmError, NotFound, PayloadTooLarge, Unauthorized
from .ingest import Origin, Outcome, Received
from .multipart import ChunkSource, MalformedMultipart, MultipartStream
from .openapi import openapi_document

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[Service] = web.AppKey("service")
ROLE_KEY: web.RequestKey[str] = web.RequestKey("role", str)
PUBLIC_PATHS = {"/health", "/v1/openapi.json"}
PARALLEL_PARTS = 16
KEEPALIVE_SECONDS = 15.0
MAX_ID = 2**62  # ids are SQLite integers
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, separators=(",", ":")))


def error_json(status: int, code: str, message: str, detail: str | None = None) -> web.Response:
    return json_response({"error": code, "message": message, "detail": detail}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MwmError as exc:
        response = error_json(exc.http_status, exc.code, exc.message, exc.detail)
        if exc.http_status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="mwm"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        response = error_json(exc.status, code, exc.reason, exc.text if exc.text != exc.reason else None)
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_json(500, "internal_error", "internal error; see the mwm log")


def auth_middleware(tokens: Mapping[str, str]) -> Middleware:
    """Bearer tokens with roles: ``read`` for GET, ``admin`` for everything that changes state."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not tokens:
            request[ROLE_KEY] = "admin"
            return await handler(request)
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("a bearer token is required", "send 'Authorization: Bearer TOKEN'")
        role = None
        for token, token_role in tokens.items():
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                role = token_role
        if role is None:
            raise Unauthorized("the token is not valid")
        needs = "read" if request.method in ("GET", "HEAD", "OPTIONS") else "admin"
        if needs == "admin" and role != "admin":
            raise Forbidden("this token may only read", f"{request.method} {request.path} needs an admin token")
        request[ROLE_KEY] = role
        return await handler(request)

    return middleware


def service_of(request: web.Request) -> Service:
    return request.app[SERVICE_KEY]


def int_param(request: web.Request, name: str, default: int, *, low: int = 0, high: int = 10_000) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be a whole number", repr(raw)) from None
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name!r} must be between {low} and {high}")
    return value


def path_id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    try:
        value = int(raw)
    except ValueError:
        raise NotFound(f"no such {name}: {raw[:40]!r}") from None
    if not 0 <= value < MAX_ID:
        raise NotFound(f"no such {name}: {raw[:40]!r}")
    return value


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > 1 << 20:
        raise PayloadTooLarge("the JSON body is larger than 1 MiB")
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("malformed JSON", str(exc)) from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def choice_param(request: web.Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in choices:
        raise BadRequest(f"query parameter {name!r} must be one of {', '.join(choices)}", repr(value))
    return value


# -- shaping rows --------------------------------------------------------------------------------


def instance_json(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": row["id"]}
    out |= {
        k: row[k]
        for k in (
            "sop_instance_uid",
            "sop_class_uid",
            "study_instance_uid",
            "series_instance_uid",
            "transfer_syntax_uid",
            "patient_id",
            "modality",
            "series_description",
            "body_part",
            "source",
            "calling_aet",
            "called_aet",
            "peer_address",
            "correlation_id",
            "storage_key",
            "size",
            "sha256",
        )
    }
    out["received_at"] = iso(row["received_at"])
    return out


def bucket_json(row: dict[str, Any], now: float) -> dict[str, Any]:
    return {
        "id": row["id"],
        "app_id": row["app_id"],
        "grouping": row["grouping"],
        "group_uid": row["group_uid"],
        "state": row["state"],
        "study_instance_uid": row["study_instance_uid"],
        "patient_id": row["patient_id"],
        "correlation_id": row["correlation_id"],
        "instance_count": row["instance_count"],
        "opened_at": iso(row["opened_at"]),
        "last_arrival_at": iso(row["last_arrival_at"]),
        "deadline": iso(row["deadline"]),
        "remaining_seconds": round(max(0.0, row["deadline"] - now), 3) if row["state"] == "open" else None,
        "closed_at": iso(row["closed_at"]),
        "close_reason": row["close_reason"],
    }


def job_json(row: dict[str, Any], now: float) -> dict[str, Any]:
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": row["id"],
        "app_id": row["app_id"],
        "bucket_id": row["bucket_id"],
        "engine": row["engine"],
        "state": row["state"],
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "correlation_id": row["correlation_id"],
        "study_instance_uid": row["study_instance_uid"],
        "patient_id": row["patient_id"],
        "instance_count": row["instance_count"],
        "result_count": row["result_count"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "launched_at": iso(row["launched_at"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "not_before": iso(row["not_before"]) if row["state"] == "scheduled" else None,
        "run_seconds": round((finished or now) - started, 3) if started else None,
        "age_seconds": round(now - row["created_at"], 3),
        "error": row["error"],
        "result_data": json.loads(row["result_data"]) if row["result_data"] else None,
    }


def result_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "job_id": row["job_id"],
        "path": row["path"],
        "size": row["size"],
        "media_type": row["media_type"],
        "sop_instance_uid": row["sop_instance_uid"],
        "sop_class_uid": row["sop_class_uid"],
        "study_instance_uid": row["study_instance_uid"],
        "series_instance_uid": row["series_instance_uid"],
        "transfer_syntax_uid": row["transfer_syntax_uid"],
        "created_at": iso(row["created_at"]),
    }


def delivery_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "result_id": row["result_id"],
        "job_id": row["job_id"],
        "sink_id": row["sink_id"],
        "state": row["state"],
        "attempts": row["attempts"],
        "next_attempt_at": iso(row["next_attempt_at"]) if row["state"] == "pending" else None,
        "last_error": row["last_error"],
        "created_at": iso(row["created_at"]),
        "delivered_at": iso(row["delivered_at"]),
    }


class Gone(MwmError):
    code = "gone"
    http_status = 410


class UnsupportedMediaType(MwmError):
    code = "unsupported_media_type"
    http_status = 415


# -- health and description ------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    service = service_of(request)
    report = await service.health()
    return json_response(report, status=503 if report["status"] == "unavailable" else 200)


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


# -- instances ---------------------------------------------------------------------------------------


def _origin(request: web.Request) -> Origin:
    service = service_of(request)
    apps = tuple(request.query.getall("app", []))
    service.ingestor.check_apps(apps)
    calling = request.headers.get("X-Calling-AET", "").strip()[:16]
    called = request.headers.get("X-Called-AET", "").strip()[:16] or service.settings.server.ae_title
    correlation = request.headers.get("X-Correlation-ID", "").strip()
    if len(correlation) > 128 or any(not c.isprintable() for c in correlation):
        raise BadRequest("X-Correlation-ID must be printable and at most 128 characters")
    peer = request.remote or ""
    return Origin(
        source="http",
        calling_aet=calling,
        called_aet=called,
        peer_address=peer,
        correlation_id=correlation or uuid.uuid4().hex,  # one upload without one: one id for all of it
        apps=apps,
    )


async def upload(request: web.Request) -> web.Response:
    service = service_of(request)
    origin = _origin(request)
    limit = service.settings.server.max_upload_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes")
    service.check_accepting()
    content_type, parameters = media_type(request.headers.get("Content-Type", ""))
    if content_type == "application/dicom":
        with service.upload_in_flight():
            outcomes = [await _upload_single(request, origin, limit)]
    elif content_type == "multipart/related":
        if parameters.get("type", "").lower() != "application/dicom":
            raise BadRequest('multipart/related uploads must declare type="application/dicom"')
        with service.upload_in_flight():
            outcomes = await _upload_multipart(request, origin, limit, parameters.get("boundary", ""))
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {content_type!r}",
            'send application/dicom, or multipart/related; type="application/dicom"',
        )
    return _upload_response(outcomes, single=content_type == "application/dicom")


_MEDIA_PARAMETER = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def media_type(header: str) -> tuple[str, dict[str, str]]:
    """The media type of a Content-Type header, lowercased, and its parameters (RFC 9110 8.3.1).

    aiohttp's own parsing goes through the ``email`` package and costs more than the rest of a
    small upload's handling; a request's boundary makes each header new to its cache.
    """
    kind, _, rest = header.partition(";")
    parameters = {}
    for name, value in _MEDIA_PARAMETER.findall(";" + rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        parameters[name.lower()] = value.strip()
    return kind.strip().lower(), parameters


def _upload_response(outcomes: list[Outcome], *, single: bool) -> web.Response:
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("stored", "duplicate", "rejected", "failed")}
    body = {"instances": [o.to_json() for o in outcomes], **counts}
    accepted = [o for o in outcomes if o.accepted]
    if outcomes and len(accepted) == len(outcomes):
        status = 200
    elif not accepted:
        status = outcomes[0].http_status if outcomes else 400
        first = outcomes[0] if outcomes else None
        body.update(
            {
                "error": "rejected" if first and first.status == "rejected" else "failed",
                "message": first.reason if first else "no instance in the upload",
                "detail": first.detail if first else None,
            }
        )
    else:
        status = 202
    if single and outcomes and not outcomes[0].accepted:
        status = outcomes[0].http_status
    return json_response(body, status=status)


class _Budget:
    """The bytes one upload may still send."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise PayloadTooLarge(f"the upload is larger than the limit of {self.limit} bytes")


async def _spool(service: Service, chunks: AsyncIterator[bytes | memoryview], budget: _Budget) -> Received:
    """Receive one instance into the staging folder; nothing is left behind if it fails."""
    spool = service.ingestor.spool()
    try:
        async for chunk in chunks:
            budget.take(len(chunk))
            await spool.write(chunk)
        return await spool.finish()
    except BaseException:
        await spool.discard()
        raise


async def _received(content: ChunkSource) -> AsyncIterator[bytes]:
    """A request body as the buffers received (aiohttp's ``iter_chunked`` joins them into new ones)."""
    while True:
        data, end_of_http_chunk = await content.readchunk()
        if data:
            yield data
        elif not end_of_http_chunk:
            return


async def _upload_single(request: web.Request, origin: Origin, limit: int) -> Outcome:
    service = service_of(request)
    staged = await _spool(service, _received(request.content), _Budget(limit))
    return await service.ingestor.ingest_file(staged, origin)


async def _upload_multipart(request: web.Request, origin: Origin, limit: int, boundary: str) -> list[Outcome]:
    service = service_of(request)
    try:
        stream = MultipartStream(request.content, boundary)
    except MalformedMultipart as exc:
        raise BadRequest("malformed multipart body", str(exc)) from None
    slots = asyncio.Semaphore(PARALLEL_PARTS)
    tasks: list[asyncio.Task[Outcome]] = []
    budget = _Budget(limit)

    async def ingest(staged: Received) -> Outcome:
        try:
            return await service.ingestor.ingest_file(staged, origin)
        finally:
            slots.release()

    try:
        async for headers in stream.parts():
            part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if part_type.startswith("multipart/"):
                raise BadRequest("nested multipart bodies are not supported")
            if part_type != "application/dicom":
                async for piece in stream.body():  # read past it; store nothing
                    budget.take(len(piece))
                tasks.append(asyncio.ensure_future(_rejected(f"unsupported part type {part_type!r}")))
                continue
            staged = await _spool(service, stream.body(), budget)
            await slots.acquire()
            tasks.append(asyncio.create_task(ingest(staged)))
    except MalformedMultipart as exc:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise BadRequest("malformed multipart body", str(exc)) from None
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return list(await asyncio.gather(*tasks))


async def _rejected(reason: str) -> Outcome:
    return Outcome(status="rejected", reason=reason, http_status=415, dicom_status=0xC000)


async def list_instances(request: web.Request) -> web.Response:
    service = service_of(request)
    rows = await service.db.list_instances(
        request.query.get("study"),
        int_param(request, "limit", 100, low=1, high=10_000),
        int_param(request, "after", 0, high=2**62),
    )
    return json_response({"instances": [instance_json(r) for r in rows]})


async def get_instance(request: web.Request) -> web.Response:
    row = await service_of(request).db.get_instance(request.match_info["uid"])
    if row is None:
        raise NotFound(f"no instance {request.match_info['uid'][:80]!r}")
    return json_response(instance_json(row))


# -- applications ---------------------------------------------------------------------------------


async def list_apps(request: web.Request) -> web.Response:
    registry = service_of(request).apps
    return json_response({"apps": registry.listing()})


async def get_app(request: web.Request) -> web.Response:
    return json_response(service_of(request).apps.describe_id(request.match_info["id"]))


async def create_app(request: web.Request) -> web.Response:
    registry = service_of(request).apps
    app = await registry.save(await read_json(request), create=True)
    return json_response(registry.describe(app), status=201)


async def update_app(request: web.Request) -> web.Response:
    registry = service_of(request).apps
    app = await registry.save(await read_json(request), app_id=request.match_info["id"], create=False)
    return json_response(registry.describe(app))


async def delete_app(request: web.Request) -> web.Response:
    await service_of(request).apps.delete(request.match_info["id"])
    return web.Response(status=204)


# -- buckets -----------------------------------------------------------------------------------------


async def list_buckets(request: web.Request) -> web.Response:
    service = service_of(request)
    state = choice_param(request, "state", ("open", "closed")) or "open"
    rows = await service.db.list_buckets(
        state, request.query.get("app"), int_param(request, "limit", 1000, low=1, high=10_000)
    )
    now = time.time()
    return json_response({"buckets": [bucket_json(r, now) for r in rows]})


async def get_bucket(request: web.Request) -> web.Response:
    service = service_of(request)
    bucket_id = path_id(request)
    row = await service.db.get_bucket(bucket_id)
    if row is None:
        raise NotFound(f"no bucket {bucket_id}")
    return json_response(bucket_json(row, time.time()))


async def close_bucket(request: web.Request) -> web.Response:
    service = service_of(request)
    job = await service.jobs.close_bucket(path_id(request), "closed by request")
    return json_response({"job": job_json(job, time.time())})


# -- jobs -------------------------------------------------------------------------------------------


async def list_jobs(request: web.Request) -> web.Response:
    service = service_of(request)
    state = choice_param(request, "state", JOB_STATES)
    rows = await service.db.list_jobs(
        state, request.query.get("app"), int_param(request, "limit", 100, low=1, high=10_000)
    )
    now = time.time()
    return json_response({"jobs": [job_json(r, now) for r in rows]})


async def _job_or_404(service: Service, job_id: int) -> dict[str, Any]:
    row = await service.db.get_job(job_id)
    if row is None:
        raise NotFound(f"no job {job_id}")
    return row


async def get_job(request: web.Request) -> web.Response:
    service = service_of(request)
    job_id = path_id(request)
    row = await _job_or_404(service, job_id)
    instances = await service.db.bucket_instances(row["bucket_id"])
    series: dict[str, dict[str, Any]] = {}
    for inst in instances:
        entry = series.setdefault(
            inst["series_instance_uid"],
            {
                "series_instance_uid": inst["series_instance_uid"],
                "modality": inst["modality"],
                "series_description": inst["series_description"],
                "instance_count": 0,
            },
        )
        entry["instance_count"] += 1
    body = job_json(row, time.time())
    body["series"] = list(series.values())
    body["results"] = [result_json(r) for r in await service.db.job_results(job_id)]
    body["deliveries"] = [delivery_json(d) for d in await service.db.job_deliveries(job_id)]
    body["log_tail"] = await service.job_log(job_id, tail=20)
    return json_response(body)


async def job_log(request: web.Request) -> web.Response:
    service = service_of(request)
    job_id = path_id(request)
    await _job_or_404(service, job_id)
    tail = int_param(request, "tail", 0, high=100_000)
    text = await service.job_log(job_id, tail=tail or None)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def cancel_job(request: web.Request) -> web.Response:
    service = service_of(request)
    job_id = path_id(request)
    await service.jobs.cancel(job_id)
    return json_response(job_json(await _job_or_404(service, job_id), time.time()))


async def retry_job(request: web.Request) -> web.Response:
    service = service_of(request)
    job_id = path_id(request)
    await service.jobs.retry(job_id)
    return json_response(job_json(await _job_or_404(service, job_id), time.time()))


# -- results, sinks and deliveries ----------------------------------------------------------------


async def list_results(request: web.Request) -> web.Response:
    service = service_of(request)
    job = request.query.get("job")
    job_id = None
    if job is not None:
        job_id = int_param(request, "job", 0, high=2**62)
    rows = await service.db.list_results(job_id, int_param(request, "limit", 100, low=1, high=10_000))
    return json_response({"results": [result_json(r) for r in rows]})


async def download_result(request: web.Request) -> web.StreamResponse:
    service = service_of(request)
    result_id = path_id(request)
    row = await service.db.get_result(result_id)
    if row is None:
        raise NotFound(f"no result {result_id}")
    if row.get("purged_at"):
        raise Gone(f"result {result_id} was deleted by the retention policy")
    response = web.StreamResponse(
        headers={
            "Content-Type": row["media_type"],
            "Content-Length": str(row["size"]),
            "Content-Disposition": f'attachment; filename="{row["path"].rsplit("/", 1)[-1]}"',
            "X-Job-ID": str(row["job_id"]),
            "X-Correlation-ID": row["correlation_id"],
        }
    )
    stream = service.storage.stream(row["storage_key"])
    first = await anext(stream, b"")  # a missing object fails here, before the headers are sent
    await response.prepare(request)
    await response.write(first)
    async for chunk in stream:
        await response.write(chunk)
    await response.write_eof()
    return response


async def ack_result(request: web.Request) -> web.Response:
    service = service_of(request)
    result_id = path_id(request)
    if await service.db.get_result(result_id) is None:
        raise NotFound(f"no result {result_id}")
    sink = None
    if request.can_read_body:
        sink = (await read_json(request)).get("sink")
    pull = service.delivery.pull_sinks
    if sink is not None:
        if sink not in pull:
            raise BadRequest(f"{sink!r} is not a pull sink")
        targets = [sink]
    else:
        targets = pull
    count = await service.db.ack_result(result_id, targets, time.time()) if targets else 0
    return json_response({"result_id": result_id, "acknowledged": count})


def _sink_or_404(service: Service, sink_id: str) -> Any:
    sink = service.delivery.sinks.get(sink_id)
    if sink is None:
        raise NotFound(f"no sink {sink_id!r}")
    return sink


async def list_sinks(request: web.Request) -> web.Response:
    service = service_of(request)
    counts = await service.db.count_deliveries()
    return json_response(
        {"sinks": [{**s.describe(), "deliveries": counts.get(s.id, {})} for s in service.delivery.sinks.values()]}
    )


async def get_sink(request: web.Request) -> web.Response:
    service = service_of(request)
    sink = _sink_or_404(service, request.match_info["id"])
    counts = await service.db.count_deliveries()
    return json_response({**sink.describe(), "deliveries": counts.get(sink.id, {})})


async def sink_results(request: web.Request) -> web.Response:
    service = service_of(request)
    sink = _sink_or_404(service, request.match_info["id"])
    if not sink.pulled:
        raise BadRequest(f"sink {sink.id!r} is a {sink.kind} sink; only pull sinks hold results for a consumer")
    rows = await service.db.pending_for_sink(
        sink.id, int_param(request, "limit", 100, low=1, high=10_000), int_param(request, "after", 0, high=2**62)
    )
    return json_response(
        {
            "results": [
                {
                    **result_json(r),
                    "delivery_id": r["delivery_id"],
                    "app_id": r["app_id"],
                    "correlation_id": r["correlation_id"],
                    "queued_at": iso(r["queued_at"]),
                    "download": f"/v1/results/{r['id']}",
                    "ack": f"/v1/results/{r['id']}/ack",
                }
                for r in rows
            ]
        }
    )


async def list_deliveries(request: web.Request) -> web.Response:
    service = service_of(request)
    rows = await service.db.list_deliveries(
        choice_param(request, "state", DELIVERY_STATES),
        request.query.get("sink"),
        int_param(request, "limit", 100, low=1, high=10_000),
    )
    return json_response({"deliveries": [delivery_json(r) for r in rows]})


async def retry_delivery(request: web.Request) -> web.Response:
    service = service_of(request)
    delivery_id = path_id(request)
    await service.delivery.retry(delivery_id)
    row = await service.db.get_delivery(delivery_id)
    assert row is not None
    return json_response(delivery_json(row))


# -- monitoring ---------------------------------------------------------------------------------


async def list_events(request: web.Request) -> web.Response:
    service = service_of(request)
    job = request.query.get("job")
    rows = await service.db.events(
        int_param(request, "after", 0, high=2**62),
        int_param(request, "job", 0, high=2**62) if job is not None else None,
        int_param(request, "limit", 200, low=1, high=10_000),
    )
    for row in rows:
        row["ts"] = iso(row["ts"])
    return json_response({"events": rows})


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every recorded event, as it is committed (``id`` is the event id).

    Starts after ``Last-Event-ID`` (a reconnecting client), else ``after``, else now.
    """
    service = service_of(request)
    last = request.headers.get("Last-Event-ID") or request.query.get("after")
    try:
        after = int(last) if last is not None else await service.db.last_event_id()
    except ValueError:
        raise BadRequest("Last-Event-ID and after must be whole numbers") from None
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    try:
        idle = 0.0
        while service.accepting:
            rows = await service.db.events(after, limit=500)
            for row in rows:
                after = row["id"]
                row["ts"] = iso(row["ts"])
                payload = json.dumps(row, separators=(",", ":"))
                await response.write(f"id: {after}\nevent: {row['kind']}\ndata: {payload}\n\n".encode())
            if rows:
                idle = 0.0
                continue
            # Short waits, so a stopping service ends the stream promptly.
            if not await service.db.wait_for_change(1.0):
                idle += 1.0
                if idle >= KEEPALIVE_SECONDS:
                    await response.write(b": keep-alive\n\n")
                    idle = 0.0
    except ConnectionResetError:  # the client left
        log.debug("event stream client left")
    return response


async def whoami(request: web.Request) -> web.Response:
    """The caller's role, so that clients offer only what they may do."""
    return json_response({"role": request.get(ROLE_KEY, "admin")})


async def metrics(request: web.Request) -> web.Response:
    service = service_of(request)
    await service.metrics.refresh(service)
    return web.Response(body=service.metrics.render(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


async def stats(request: web.Request) -> web.Response:
    data = await service_of(request).stats()
    data["since"] = iso(data["since"])
    return json_response(data)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/health", health),
        web.get("/v1/openapi.json", openapi),
        web.post("/v1/instances", upload),
        web.get("/v1/instances", list_instances),
        web.get("/v1/instances/{uid}", get_instance),
        web.get("/v1/apps", list_apps),
        web.post("/v1/apps", create_app),
        web.get("/v1/apps/{id}", get_app),
        web.put("/v1/apps/{id}", update_app),
        web.delete("/v1/apps/{id}", delete_app),
        web.get("/v1/buckets", list_buckets),
        web.get("/v1/buckets/{id}", get_bucket),
        web.post("/v1/buckets/{id}/close", close_bucket),
        web.get("/v1/jobs", list_jobs),
        web.get("/v1/jobs/{id}", get_job),
        web.get("/v1/jobs/{id}/log", job_log),
        web.post("/v1/jobs/{id}/cancel", cancel_job),
        web.post("/v1/jobs/{id}/retry", retry_job),
        web.get("/v1/results", list_results),
        web.get("/v1/results/{id}", download_result),
        web.post("/v1/results/{id}/ack", ack_result),
        web.get("/v1/sinks", list_sinks),
        web.get("/v1/sinks/{id}", get_sink),
        web.get("/v1/sinks/{id}/results", sink_results),
        web.get("/v1/deliveries", list_deliveries),
        web.post("/v1/deliveries/{id}/retry", retry_delivery),
        web.get("/v1/events", list_events),
        web.get("/v1/events/stream", event_stream),
        web.get("/metrics", metrics),
        web.get("/v1/whoami", whoami),
        web.get("/v1/stats", stats),
    ]


def build_application(service: Service, tokens: Mapping[str, str]) -> web.Application:
    """The aiohttp application; ``tokens`` maps each bearer token to its role (empty: no auth)."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(tokens)],  # type: ignore[list-item]
        client_max_size=1 << 20,
    )
    app[SERVICE_KEY] = service
    app.add_routes(routes())
    return app
