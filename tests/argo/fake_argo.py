"""A strict fake Argo Server: an aiohttp server that checks every request against the published API.

What it checks, on every request: the path and method exist in the API description, the query
parameters are declared and typed, the body validates against its definition (with
``additionalProperties: false`` everywhere), and the bearer token is one it accepts. Its own
answers are validated too; any mismatch is recorded in ``violations`` (the test fixture fails the
test on it) and answered with 400.

What it simulates: a workflow's life, Pending, Running, then Succeeded, Failed or Error. While
running it reads the input artifact's objects from the S3 test server at the key the workflow
names, with the credentials of the Kubernetes secrets it names, counts them, and writes a
``result.txt``, a ``metadata.json`` and ``reports/summary.txt`` to the output artifact's key. A
container's environment drives it:

- ``FAKE_OUTCOME``: ``succeed`` (default), ``fail`` (exit code 3), ``error``, ``hang`` (until
  terminated or past ``activeDeadlineSeconds``);
- ``FAKE_RUN_SECONDS``: how long the step runs (default ``run_seconds``);
- ``FAKE_MESSAGE``: the failure's message.

``stop()`` and ``start()`` make it unreachable and back on the same port; the simulated cluster
goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .spec import Api, Operation, load_spec

KINDS = {
    "WorkflowService_CreateWorkflow": "submit",
    "WorkflowService_GetWorkflow": "get",
    "WorkflowService_ListWorkflows": "list",
    "WorkflowService_WorkflowLogs": "log",
    "WorkflowService_TerminateWorkflow": "terminate",
    "WorkflowService_DeleteWorkflow": "delete",
}
# gRPC codes the Argo Server puts in its error bodies.
UNAUTHENTICATED, NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT, UNIMPLEMENTED, UNAVAILABLE = 16, 5, 6, 3, 12, 14
COMPLETED = "workflows.argoproj.io/completed"
PHASE_LABEL = "workflows.argoproj.io/phase"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Seen:
    """One request the fake received."""

    method: str
    path: str
    kind: str
    query: dict[str, list[str]]
    body: Any
    status: int = 0
    at: float = field(default_factory=time.time)


@dataclass
class Life:
    """The simulated controller's state of one workflow."""

    terminate: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    logs: list[str] = field(default_factory=list)


class FakeArgo:
    """``await FakeArgo(...).start()``; ``url`` once started; ``close()`` at the end."""

    def __init__(
        self,
        *,
        s3_url: str,
        secrets: Mapping[str, Mapping[str, str]],
        tokens: set[str],
        default_repository: Mapping[str, Any] | None = None,
        run_seconds: float = 0.2,
        pending_seconds: float = 0.1,
        ca_bundle: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.api = Api(load_spec())
        self.s3_url = s3_url
        self.secrets = {name: dict(values) for name, values in secrets.items()}
        self.tokens = set(tokens)
        self.default_repository = dict(default_repository or {})
        self.run_seconds = run_seconds
        self.pending_seconds = pending_seconds
        self.ca_bundle = ca_bundle
        self.tls = tls
        self.workflows: dict[tuple[str, str], dict[str, Any]] = {}
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}
        self.lives: dict[tuple[str, str], Life] = {}
        self.requests: list[Seen] = []
        self.counts: Counter[str] = Counter()
        self.created: list[dict[str, Any]] = []
        #: When each workflow finished on the simulated cluster (``time.time()``).
        self.finished_at: dict[tuple[str, str], float] = {}
        self.violations: list[str] = []
        #: Answer this many creates with 504 after creating the workflow (an answer lost on the way).
        self.lose_create_answers = 0
        #: Answer this many requests with this status before handling them ((status, count)).
        self.inject: tuple[int, int] = (0, 0)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._s3: dict[tuple[str, str, str], Any] = {}
        self._s3_stack = contextlib.AsyncExitStack()
        self._resource_version = itertools.count(1000)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # -- server lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.tls)
        await site.start()
        self._runner = runner
        if not self.port:
            self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Unreachable from now on (connections refused); workflows keep running."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def close(self) -> None:
        await self.stop()
        tasks = [life.task for life in self.lives.values() if life.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._s3_stack.aclose()

    def count(self, kind: str) -> int:
        return self.counts[kind]

    def add_template(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        """A WorkflowTemplate the simulated cluster knows (``workflowTemplateRef`` resolves to it)."""
        self.templates[(namespace, name)] = copy.deepcopy(dict(spec))

    # -- request handling ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = {k: request.query.getall(k) for k in request.query}
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        op, params, path_known = self.api.match(request.method, request.path)
        seen = Seen(request.method, request.path, KINDS.get(op.operation_id, "other") if op else "unknown", query, body)
        self.requests.append(seen)
        self.counts[seen.kind] += 1
        if op is None:
            problem = f"{request.method} {request.path}: {'method' if path_known else 'path'} not in the API"
            self.violations.append(problem)
            seen.status = 404 if not path_known else 405
            return web.json_response({"code": UNIMPLEMENTED, "message": problem}, status=seen.status)
        try:
            response = await self._checked(op, params, query, body, request, seen)
        except Exception as exc:  # noqa: BLE001 - a fault of the fake must fail the test, not hide
            self.violations.append(f"the fake failed on {request.method} {request.path}: {exc!r}")
            response = web.json_response({"code": 13, "message": "internal error of the fake"}, status=500)
        seen.status = response.status
        return response

    async def _checked(
        self,
        op: Operation,
        params: dict[str, str],
        query: dict[str, list[str]],
        body: Any,
        request: web.Request,
        seen: Seen,
    ) -> web.StreamResponse:
        status, count = self.inject
        if count > 0:
            self.inject = (status, count - 1)
            return self._answer(op, status, {"code": UNAVAILABLE, "message": f"injected HTTP {status}"})
        authorization = request.headers.get("Authorization", "")
        token = authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None
        if token not in self.tokens:
            message = "token not valid. see https://argo-workflows.readthedocs.io/en/latest/faq/"
            return self._answer(op, 401, {"code": UNAUTHENTICATED, "message": message})
        problems = self.api.query_errors(op, query)
        schema = op.body_schema()
        if schema is not None:
            if request.content_type != "application/json":
                problems.append(f"body sent as {request.content_type!r}, not application/json")
            problems += [f"body {e}" for e in self.api.schema_errors(schema, body)]
        elif body is not None:
            problems.append("a body where the API takes none")
        if problems:
            self.violations += [f"{op.method} {request.path}: {p}" for p in problems]
            return self._answer(op, 400, {"code": INVALID_ARGUMENT, "message": "; ".join(problems)[:2000]})
        handler = getattr(self, "_op_" + op.operation_id.split("_", 1)[-1], None)
        if handler is None:
            return self._answer(op, 501, {"code": UNIMPLEMENTED, "message": f"the fake does not do {op.operation_id}"})
        return await handler(op, params, query, body, request)  # type: ignore[no-any-return]

    def _answer(self, op: Operation, status: int, body: Any, fields: str | None = None) -> web.Response:
        problems = self.api.response_errors(op, status, body)
        if problems:
            self.violations += [f"the fake's own answer to {op.operation_id}: {p}" for p in problems]
        if fields:
            body = filter_fields(body, fields)
        return web.json_response(body, status=status)

    # -- operations ---------------------------------------------------------------------------

    async def _op_CreateWorkflow(self, op: Operation, params: dict[str, str], query: Any, body: Any, request: Any):
        namespace = params["namespace"]
        if body.get("namespace") not in (None, namespace):
            return self._answer(op, 400, {"code": INVALID_ARGUMENT, "message": "namespace mismatch"})
        workflow = copy.deepcopy(body["workflow"])
        metadata = workflow.setdefault("metadata", {})
        name = metadata.get("name") or f"{metadata.get('generateName', 'wf-')}{uuid.uuid4().hex[:5]}"
        if (namespace, name) in self.workflows:
            return self._answer(
                op, 409, {"code": ALREADY_EXISTS, "message": f'workflows.argoproj.io "{name}" already exists'}
            )
        self.created.append(copy.deepcopy(body))
        metadata.pop("generateName", None)
        metadata.update(
            name=name,
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
            resourceVersion=str(next(self._resource_version)),
            generation=1,
        )
        metadata.setdefault("labels", {})
        workflow.setdefault("apiVersion", "argoproj.io/v1alpha1")
        workflow.setdefault("kind", "Workflow")
        workflow["status"] = {}
        self.workflows[(namespace, name)] = workflow
        life = self.lives[(namespace, name)] = Life()
        life.task = asyncio.create_task(self._live(namespace, name, life), name=f"fake-argo-{name}")
        if self.lose_create_answers > 0:
            self.lose_create_answers -= 1
            return self._answer(op, 504, {"code": UNAVAILABLE, "message": "upstream request timeout"})
        return self._answer(op, 200, workflow)

    async def _op_GetWorkflow(
        self, op: Operation, params: dict[str, str], query: dict[str, list[str]], body: Any, request: Any
    ):
        workflow = self.workflows.get((params["namespace"], params["name"]))
        if workflow is None:
            return self._not_found(op, params["name"])
        return self._answer(op, 200, workflow, fields=(query.get("fields") or [None])[0])

    async def _op_ListWorkflows(
        self, op: Operation, params: dict[str, str], query: dict[str, list[str]], body: Any, request: Any
    ):
        namespace = params["namespace"]
        selector = parse_selector((query.get("listOptions.labelSelector") or [""])[0])
        items = [
            wf
            for (ns, _name), wf in sorted(self.workflows.items())
            if ns == namespace and selector_matches(selector, wf["metadata"].get("labels") or {})
        ]
        start = int((query.get("listOptions.continue") or ["0"])[0] or 0)
        limit = int((query.get("listOptions.limit") or ["0"])[0] or 0)
        page = items[start : start + limit] if limit else items[start:]
        metadata: dict[str, Any] = {"resourceVersion": str(next(self._resource_version))}
        if limit and start + limit < len(items):
            metadata["continue"] = str(start + limit)
        return self._answer(op, 200, {"metadata": metadata, "items": page}, fields=(query.get("fields") or [None])[0])

    async def _op_TerminateWorkflow(self, op: Operation, params: dict[str, str], query: Any, body: Any, request: Any):
        key = (params["namespace"], params["name"])
        workflow = self.workflows.get(key)
        if workflow is None:
            return self._not_found(op, params["name"])
        workflow["spec"]["shutdown"] = "Terminate"
        self.lives[key].terminate.set()
        return self._answer(op, 200, workflow)

    async def _op_DeleteWorkflow(self, op: Operation, params: dict[str, str], query: Any, body: Any, request: Any):
        key = (params["namespace"], params["name"])
        if key not in self.workflows:
            return self._not_found(op, params["name"])
        self.delete(*key)
        return self._answer(op, 200, {})

    def delete(self, namespace: str, name: str) -> None:
        """Remove a workflow (as ``kubectl delete`` would, behind mwm's back)."""
        self.workflows.pop((namespace, name), None)
        life = self.lives.get((namespace, name))
        if life is not None and life.task is not None:
            life.task.cancel()

    async def _op_WorkflowLogs(
        self, op: Operation, params: dict[str, str], query: dict[str, list[str]], body: Any, request: web.Request
    ):
        key = (params["namespace"], params["name"])
        if key not in self.workflows:
            return self._not_found(op, params["name"])
        life = self.lives[key]
        lines = []
        for text in life.logs:
            entry = {"result": {"content": text, "podName": params["name"]}}
            problems = self.api.response_errors(op, 200, entry)
            if problems:
                self.violations += [f"the fake's own log line: {p}" for p in problems]
            lines.append(json.dumps(entry))
        return web.Response(body=("\n".join(lines) + "\n").encode(), content_type="application/json")

    def _not_found(self, op: Operation, name: str) -> web.Response:
        return self._answer(op, 404, {"code": NOT_FOUND, "message": f'workflows.argoproj.io "{name}" not found'})

    # -- the simulated controller -------------------------------------------------------------

    def _set(self, namespace: str, name: str, **status: Any) -> dict[str, Any] | None:
        workflow = self.workflows.get((namespace, name))
        if workflow is None:
            return None
        workflow["status"].update(status)
        workflow["metadata"]["resourceVersion"] = str(next(self._resource_version))
        phase = workflow["status"].get("phase")
        if phase:
            workflow["metadata"]["labels"][PHASE_LABEL] = phase
        if phase in ("Succeeded", "Failed", "Error"):
            workflow["metadata"]["labels"][COMPLETED] = "true"
            self.finished_at.setdefault((namespace, name), time.time())
        return workflow

    def _node(self, name: str, phase: str, message: str = "", exit_code: int | None = None) -> dict[str, Any]:
        node: dict[str, Any] = {
            "id": name,
            "name": name,
            "displayName": name,
            "type": "Pod",
            "templateName": "main",
            "phase": phase,
            "startedAt": now_rfc3339(),
        }
        if message:
            node["message"] = message
        if phase in ("Succeeded", "Failed", "Error"):
            node["finishedAt"] = now_rfc3339()
        if exit_code is not None:
            node["outputs"] = {"exitCode": str(exit_code)}
        return {name: node}

    async def _live(self, namespace: str, name: str, life: Life) -> None:
        workflow = self.workflows[(namespace, name)]
        spec = workflow["spec"]
        await asyncio.sleep(self.pending_seconds)
        self._set(namespace, name, phase="Pending", startedAt=now_rfc3339(), nodes=self._node(name, "Pending"))
        await asyncio.sleep(self.pending_seconds)
        try:
            template, arguments = self._resolve(namespace, spec)
        except LookupError as exc:
            self._set(namespace, name, phase="Error", message=str(exc), finishedAt=now_rfc3339())
            return
        env = {e["name"]: e.get("value", "") for e in (template.get("container") or {}).get("env", [])}
        self._set(namespace, name, phase="Running", nodes=self._node(name, "Running"))
        outcome = env.get("FAKE_OUTCOME", "succeed")
        seconds = float(env.get("FAKE_RUN_SECONDS", self.run_seconds))
        deadline = spec.get("activeDeadlineSeconds")
        try:
            async with asyncio.timeout(deadline):
                finished = await self._run(namespace, name, life, template, arguments, env, outcome, seconds)
        except TimeoutError:
            self._set(
                namespace,
                name,
                phase="Failed",
                message="Step exceeded its deadline",
                finishedAt=now_rfc3339(),
                nodes=self._node(name, "Failed", "Step exceeded its deadline"),
            )
            return
        if finished is None:  # terminated
            message = "Stopped with strategy 'Terminate'"
            life.logs.append("terminated")
            self._set(
                namespace,
                name,
                phase="Failed",
                message=message,
                finishedAt=now_rfc3339(),
                nodes=self._node(name, "Failed", message, exit_code=143),
            )
            return
        phase, message, exit_code = finished
        self._set(
            namespace,
            name,
            phase=phase,
            message=message,
            finishedAt=now_rfc3339(),
            nodes=self._node(name, phase, message if phase != "Succeeded" else "", exit_code),
        )

    def _resolve(self, namespace: str, spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The container template to run and the arguments it gets (from a WorkflowTemplate if referenced)."""
        arguments = dict(spec.get("arguments") or {})
        templates = spec.get("templates") or []
        entrypoint = spec.get("entrypoint")
        ref = spec.get("workflowTemplateRef")
        if ref:
            stored = self.templates.get((namespace, ref["name"]))
            if stored is None:
                raise LookupError(f'workflowtemplates.argoproj.io "{ref["name"]}" not found')
            templates = stored.get("templates") or []
            entrypoint = stored.get("entrypoint")
        for template in templates:
            if template.get("name") == entrypoint:
                return template, arguments
        raise LookupError(f"template {entrypoint!r} not found")

    async def _run(
        self,
        namespace: str,
        name: str,
        life: Life,
        template: Mapping[str, Any],
        arguments: Mapping[str, Any],
        env: Mapping[str, str],
        outcome: str,
        seconds: float,
    ) -> tuple[str, str, int | None] | None:
        """Run the step; ``None`` when terminated, else (phase, message, exit code)."""
        parameters = {p["name"]: p.get("value", "") for p in arguments.get("parameters") or []}
        given = {a["name"]: a for a in arguments.get("artifacts") or []}
        try:
            inputs = []
            for artifact in (template.get("inputs") or {}).get("artifacts") or []:
                location = {**(artifact.get("s3") or {}), **((given.get(artifact["name"]) or {}).get("s3") or {})}
                inputs.append(await self._download(location, life))
        except _ArtifactError as exc:
            return "Error", f"failed to load artifacts: {exc}", None
        if outcome == "hang":
            seconds = 3600.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(life.terminate.wait(), seconds)
        if life.terminate.is_set():
            return None
        if outcome == "fail":
            life.logs.append(env.get("FAKE_MESSAGE", "the application gave up: no usable series"))
            return "Failed", env.get("FAKE_MESSAGE", "Error (exit code 3)"), 3
        if outcome == "error":
            return "Error", env.get("FAKE_MESSAGE", "pod deleted"), None
        files = [f for found in inputs for f in found]
        metadata = {
            "workflow": name,
            "instances": len(files),
            "bytes": sum(len(data) for _key, data in files),
            "input_path": env.get("HOLOSCAN_INPUT_PATH"),
            "output_path": env.get("HOLOSCAN_OUTPUT_PATH"),
        }
        outputs = {
            "result.txt": f"{len(files)} instances\n".encode(),
            "metadata.json": json.dumps(metadata).encode(),
            "reports/summary.txt": b"ok\n",
        }
        try:
            for artifact in (template.get("outputs") or {}).get("artifacts") or []:
                location = dict(artifact.get("s3") or {})
                key = location.get("key", "")
                location["key"] = re.sub(
                    r"\{\{workflow\.parameters\.([A-Za-z0-9_-]+)\}\}", lambda m: parameters.get(m.group(1), ""), key
                )
                await self._upload(location, outputs)
        except _ArtifactError as exc:
            return "Error", f"failed to save outputs: {exc}", None
        life.logs.append(f"wrote {len(outputs)} files")
        return "Succeeded", "", 0

    # -- S3 as a pod would see it -------------------------------------------------------------

    async def _client(self, location: Mapping[str, Any]) -> tuple[Any, str]:
        repo = {**self.default_repository, **{k: v for k, v in location.items() if k != "key"}}
        endpoint = repo.get("endpoint")
        bucket = repo.get("bucket")
        if not endpoint or not bucket:
            raise _ArtifactError("no artifact repository: the artifact names no endpoint or bucket")
        url = f"{'http' if repo.get('insecure') else 'https'}://{endpoint}"
        if url != self.s3_url:
            raise _ArtifactError(f"cannot reach {url}")
        key_id = self._secret(repo.get("accessKeySecret"))
        secret = self._secret(repo.get("secretKeySecret"))
        cache_key = (url, key_id, secret)
        if cache_key not in self._s3:
            from aiobotocore.session import AioSession

            self._s3[cache_key] = await self._s3_stack.enter_async_context(
                AioSession().create_client(
                    "s3",
                    endpoint_url=url,
                    region_name=repo.get("region") or "us-east-1",
                    aws_access_key_id=key_id,
                    aws_secret_access_key=secret,
                    verify=self.ca_bundle,
                )
            )
        return self._s3[cache_key], bucket

    def _secret(self, selector: Mapping[str, Any] | None) -> str:
        if not selector:
            raise _ArtifactError("no credentials: the artifact names no secret")
        values = self.secrets.get(selector.get("name", ""))
        if values is None or selector["key"] not in values:
            raise _ArtifactError(f'secret "{selector.get("name")}" with key "{selector["key"]}" not found')
        return values[selector["key"]]

    async def _download(self, location: Mapping[str, Any], life: Life) -> list[tuple[str, bytes]]:
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket = await self._client(location)
        prefix = location.get("key", "").rstrip("/") + "/"
        found: list[tuple[str, bytes]] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    answer = await client.get_object(Bucket=bucket, Key=item["Key"])
                    async with answer["Body"] as stream:
                        found.append((item["Key"], await stream.read()))
        except (ClientError, BotoCoreError) as exc:
            raise _ArtifactError(str(exc)) from exc
        if not found:
            raise _ArtifactError(f"no objects under s3://{bucket}/{prefix}")
        life.logs.append(f"read {len(found)} objects from s3://{bucket}/{prefix}")
        return found

    async def _upload(self, location: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket = await self._client(location)
        prefix = location.get("key", "").rstrip("/")
        try:
            for relative, data in files.items():
                await client.put_object(Bucket=bucket, Key=f"{prefix}/{relative}", Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise _ArtifactError(str(exc)) from exc


class _ArtifactError(Exception):
    pass


# -- label selectors and field filters (as the Argo Server applies them) ----------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[A-Za-z0-9._-]*)|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def parse_selector(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Kubernetes label selector requirements as (operator, key, values)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    out = []
    for part in parts:
        m = _REQUIREMENT.match(part)
        if m is None:
            raise ValueError(f"invalid label selector requirement {part!r}")
        if m.group("neg"):
            out.append(("!exists", m.group("key"), ()))
        elif m.group("op"):
            op = "!=" if m.group("op") == "!=" else "="
            out.append((op, m.group("key"), (m.group("value"),)))
        elif m.group("set"):
            values = tuple(v.strip() for v in m.group("values").split(",") if v.strip())
            out.append((m.group("set"), m.group("key"), values))
        else:
            out.append(("exists", m.group("key"), ()))
    return out


def selector_matches(requirements: list[tuple[str, str, tuple[str, ...]]], labels: Mapping[str, str]) -> bool:
    for op, key, values in requirements:
        value = labels.get(key)
        if op == "=" and value != values[0]:
            return False
        if op == "!=" and value == values[0]:
            return False
        if op == "exists" and value is None:
            return False
        if op == "!exists" and value is not None:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and value in values:
            return False
    return True


def filter_fields(body: Any, fields: str) -> Any:
    """Keep only the listed dotted paths (``"metadata,items.metadata.name"``), or drop the ``-`` ones."""
    paths = [p.strip() for p in fields.split(",") if p.strip()]
    if paths and all(p.startswith("-") for p in paths):
        body = copy.deepcopy(body)
        for path in paths:
            _drop(body, path[1:].split("."))
        return body
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
        node["*"] = True
    return _keep(body, tree)


def _keep(value: Any, tree: Mapping[str, Any]) -> Any:
    if tree.get("*"):
        return copy.deepcopy(value)
    if isinstance(value, list):
        return [_keep(v, tree) for v in value]
    if not isinstance(value, Mapping):
        return value
    return {k: _keep(v, tree[k]) for k, v in value.items() if k in tree}


def _drop(value: Any, parts: list[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _drop(item, parts)
    elif isinstance(value, dict) and parts:
        if len(parts) == 1:
            value.pop(parts[0], None)
        elif parts[0] in value:
            _drop(value[parts[0]], parts[1:])


def wait_for_phase(fake: FakeArgo, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 10.0) -> Any:
    """A coroutine that returns once the workflow is in one of ``phases``."""

    async def wait() -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workflow = fake.workflows.get((namespace, name))
            if workflow is not None and workflow["status"].get("phase") in phases:
                return workflow
            await asyncio.sleep(0.02)
        raise AssertionError(f"workflow {namespace}/{name} did not reach {phases}")

    return wait()
