"""The published OpenAPI description (``mwm/openapi.json``) against the code and a running service.

The document must be a valid OpenAPI 3.1 description, describe exactly the routes the API registers,
and every answer of a real service, driven through every endpoint, must have a documented status and
a body valid against the schema documented for that path, method and status.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import synthetic
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from support import SAMPLE_APP, ServiceFactory, url_of

import mwm
from mwm.api import PUBLIC_PATHS, routes
from mwm.openapi import openapi_document
from mwm.service import Service

DOCUMENT_FILE = Path(mwm.__file__).parent / "openapi.json"
DOCUMENT_URI = "urn:mwm:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
READ_TOKEN = "read-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"
SLEEPER = ["python", "-c", "import time; time.sleep(60)"]


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT_FILE.read_text(encoding="utf-8"))
    return document


def escape(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def operations(document: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def walk(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object in a JSON tree with its JSON Pointer."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from walk(value, f"{where}/{escape(str(key))}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{where}/{index}")


def format_checker() -> FormatChecker:
    """``date-time`` checked without optional packages: RFC 3339, with a time zone."""
    checker = FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def is_date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", value):
            raise ValueError(f"{value!r} is not an RFC 3339 date-time")
        datetime.fromisoformat(value)
        return True

    return checker


class Contract:
    """Checks answers against the document and records which operations were exercised."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)
        self.format_checker = format_checker()
        self.templates = [
            (re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$"), path)
            for path in document["paths"]
        ]
        self.seen: set[tuple[str, str, int]] = set()

    def resolve(self, pointer: str) -> Any:
        node: Any = self.document
        for token in pointer.removeprefix("#/").split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            node = node[int(token)] if isinstance(node, list) else node[token]
        return node

    def follow(self, pointer: str) -> tuple[str, Any]:
        """The pointer and value at ``pointer``, following ``$ref`` (to components) as needed."""
        node = self.resolve(pointer)
        while isinstance(node, dict) and "$ref" in node and len(node) == 1:
            pointer = node["$ref"]
            node = self.resolve(pointer)
        return pointer, node

    def template_of(self, path: str) -> str:
        matching = [template for pattern, template in self.templates if pattern.match(path)]
        assert matching, f"{path} matches no path of the document"
        return min(matching, key=lambda t: t.count("{"))

    def validate(self, pointer: str, instance: Any) -> None:
        validator = Draft202012Validator(
            {"$ref": f"{DOCUMENT_URI}{pointer}"}, registry=self.registry, format_checker=self.format_checker
        )
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10]
        )

    def check_request(self, method: str, template: str, params: Any, headers: Mapping[str, str]) -> None:
        """Every query parameter and custom header the test sends is documented."""
        op_pointer = f"#/paths/{escape(template)}/{method}"
        declared = [*self.resolve(f"#/paths/{escape(template)}").get("parameters", [])]
        declared += self.resolve(op_pointer).get("parameters", [])
        names = {(p["in"], p["name"].lower()) for p in declared}
        pairs = params.items() if isinstance(params, Mapping) else (params or [])
        for name, _ in pairs:
            assert ("query", name.lower()) in names, f"{method.upper()} {template}: query {name!r} not documented"
        for name in headers:
            if name.lower().startswith("x-"):
                assert ("header", name.lower()) in names, f"{method.upper()} {template}: header {name!r} undocumented"

    def check_request_body(self, method: str, template: str, body: Any) -> None:
        """A JSON body the service accepted is valid against the documented request body."""
        pointer = f"#/paths/{escape(template)}/{method}/requestBody"
        request_body = self.resolve(pointer.rsplit("/", 1)[0]).get("requestBody")
        assert request_body is not None, f"{method.upper()} {template}: no request body is documented"
        assert "application/json" in request_body["content"], f"{method.upper()} {template}: JSON not documented"
        self.validate(f"{pointer}/content/application~1json/schema", body)

    def check_response(self, method: str, template: str, status: int, content_type: str, body: bytes) -> Any:
        """Validate one answer; returns the decoded JSON body (or the raw bytes)."""
        op_pointer = f"#/paths/{escape(template)}/{method}"
        responses = self.resolve(op_pointer)["responses"]
        assert str(status) in responses, (
            f"{method.upper()} {template} answered {status}, which is not documented: {body[:300]!r}"
        )
        self.seen.add((method, template, status))
        pointer, response = self.follow(f"{op_pointer}/responses/{status}")
        content = response.get("content")
        if not content:
            assert body == b"", f"{method.upper()} {template} {status}: a body where none is documented"
            return None
        if content_type == "application/json":
            assert "application/json" in content, f"{method.upper()} {template} {status}: JSON is not documented"
            data = json.loads(body)
            self.validate(f"{pointer}/content/application~1json/schema", data)
            return data
        assert content_type in content or "*/*" in content, (
            f"{method.upper()} {template} {status}: {content_type} is not documented ({sorted(content)})"
        )
        media = content.get(content_type, {})
        if "schema" in media and media["schema"].get("type") == "string":
            return body.decode("utf-8")
        return body


class Api:
    """A small HTTP client: each call checks the answer against the document and the expected status."""

    def __init__(self, session: aiohttp.ClientSession, service: Service, contract: Contract) -> None:
        self.session = session
        self.base = url_of(service)
        self.contract = contract
        self.last_headers: Mapping[str, str] = {}

    async def call(
        self,
        method: str,
        path: str,
        expect: int | tuple[int, ...],
        *,
        params: Any = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        method = method.lower()
        template = self.contract.template_of(urlsplit(path).path)
        self.contract.check_request(method, template, params, headers or {})
        async with self.session.request(
            method.upper(), self.base + path, params=params, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            self.last_headers = response.headers
            data = self.contract.check_response(method, template, response.status, response.content_type, body)
            expected = (expect,) if isinstance(expect, int) else expect
            assert response.status in expected, (
                f"{method.upper()} {path}: expected {expected}, got {response.status}: {body[:300]!r}"
            )
        if "json" in kwargs and response.status < 300:
            self.contract.check_request_body(method, template, kwargs["json"])
        return data

    async def get(self, path: str, expect: int | tuple[int, ...] = 200, **kwargs: Any) -> Any:
        return await self.call("GET", path, expect, **kwargs)

    async def post(self, path: str, expect: int | tuple[int, ...] = 200, **kwargs: Any) -> Any:
        return await self.call("POST", path, expect, **kwargs)

    async def upload(
        self, files: list[bytes], expect: int | tuple[int, ...], *, part_type: str = "application/dicom", **kwargs: Any
    ) -> Any:
        writer = multipart(files, part_type)
        content_type = f'multipart/related; type="application/dicom"; boundary="{writer.boundary}"'
        headers = {**kwargs.pop("headers", {}), "Content-Type": content_type}
        return await self.post("/v1/instances", expect, data=writer, headers=headers, **kwargs)

    async def wait_for(self, path: str, done: Any, timeout: float = 40.0, **kwargs: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            data = await self.get(path, **kwargs)
            if done(data):
                return data
            assert time.monotonic() < deadline, f"timed out waiting on {path}: {data}"
            await asyncio.sleep(0.1)


def multipart(files: list[bytes], part_type: str = "application/dicom") -> aiohttp.MultipartWriter:
    writer = aiohttp.MultipartWriter("related")
    for data in files:
        writer.append(data, {"Content-Type": part_type})
    return writer


@pytest.fixture
def contract() -> Contract:
    return Contract(load_document())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


# -- the document ------------------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    document = load_document()
    assert document["openapi"] == "3.1.0"
    validator.validate(document)


def test_document_structure_and_references() -> None:
    document = load_document()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "mwm"
    assert len(document["info"]["description"]) > 200
    assert document["servers"] == [{"url": "http://127.0.0.1:8080"}]
    assert document["components"]["securitySchemes"]["bearer"] == {
        **document["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    assert document["security"] == [{"bearer": []}]
    contract = Contract(document)

    referenced: set[str] = set()
    for where, node in walk(document):
        if "$ref" in node and isinstance(node["$ref"], str):
            target = node["$ref"]
            assert target.startswith("#/"), f"{where}: only local references are used, got {target}"
            try:
                contract.resolve(target)
            except (KeyError, IndexError, ValueError):
                pytest.fail(f"{where}: $ref {target} does not resolve")
            referenced.add(target)
    for kind in ("schemas", "responses"):
        for name in document["components"][kind]:
            assert f"#/components/{kind}/{name}" in referenced, f"components/{kind}/{name} is never used"

    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        for where, node in walk(schema, f"#/components/schemas/{name}"):
            assert node.get("nullable") is None, f"{where}: 'nullable' is OpenAPI 3.0; use a type list"

    for path, method, operation in operations(document):
        label = f"{method.upper()} {path}"
        assert operation.get("operationId"), label
        statuses = set(operation["responses"])
        assert any(s.startswith("2") for s in statuses), f"{label}: no success status"
        assert "default" not in statuses, f"{label}: every status is listed, no default"
        if path in PUBLIC_PATHS:
            assert operation.get("security") == [], f"{label} needs no token"
            assert not statuses & {"401", "403"}, label
        else:
            assert "security" not in operation, f"{label} uses the global security"
            assert "401" in statuses, f"{label}: 401 is missing"
            assert ("403" in statuses) == (method != "get"), f"{label}: 403 is for requests that change state"
        for status in statuses:
            _, response = contract.follow(f"#/paths/{escape(path)}/{method}/responses/{status}")
            assert response.get("description"), f"{label} {status}: no description"
            if status.startswith(("4", "5")):
                assert "application/json" in response.get("content", {}), f"{label} {status}: errors are JSON"
        # Path parameters: exactly those in the template, each required.
        declared = [*document["paths"][path].get("parameters", []), *operation.get("parameters", [])]
        in_path = {p["name"] for p in declared if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{([^}]+)\}", path)), label
        assert all(p["required"] for p in declared if p["in"] == "path"), label


def test_the_checks_catch_mismatches(contract: Contract) -> None:
    """The answer checks used below reject what the document does not allow."""
    error = {"error": "not_found", "message": "no job 7", "detail": None}
    contract.check_response("get", "/v1/jobs/{id}", 404, "application/json", json.dumps(error).encode())
    wrong_bodies = [
        ("/v1/jobs/{id}", 404, {**error, "extra": 1}),
        ("/v1/jobs/{id}", 404, {"error": "not_found", "message": "no job 7"}),
        ("/v1/jobs/{id}", 418, error),
        ("/v1/buckets/{id}", 200, {"id": 1}),
        (
            "/v1/events",
            200,
            {
                "events": [
                    {
                        "id": 1,
                        "ts": "yesterday",
                        "kind": "x",
                        "app_id": None,
                        "bucket_id": None,
                        "job_id": None,
                        "correlation_id": None,
                        "message": "m",
                        "data": None,
                    }
                ]
            },
        ),
    ]
    for template, status, body in wrong_bodies:
        with pytest.raises(AssertionError):
            contract.check_response("get", template, status, "application/json", json.dumps(body).encode())
    with pytest.raises(AssertionError):  # a body where the document says there is none
        contract.check_response("delete", "/v1/apps/{id}", 204, "application/json", b"{}")
    with pytest.raises(AssertionError):  # JSON where the document says text
        contract.check_response("get", "/v1/jobs/{id}/log", 200, "application/json", b"{}")

    contract.check_request_body("post", "/v1/apps", {"id": "a", "command": ["run"], "timeout": "250ms"})
    contract.check_request_body("post", "/v1/apps", {"id": "a", "engine": "argo", "image": "x"})
    for invalid in (
        {"command": ["run"]},
        {"id": "bad id!", "command": ["run"]},
        {"id": "a"},
        {"id": "a", "command": ["run"], "max_parallel": 0},
        {"id": "a", "command": ["run"], "timeout": "soon"},
        {"id": "a", "command": ["run"], "match": {"colour": ["red"]}},
    ):
        with pytest.raises(AssertionError):
            contract.check_request_body("post", "/v1/apps", invalid)


def route_key(method: str, path: str) -> tuple[str, str]:
    return method.lower(), re.sub(r"\{([^}:]+)(:[^}]*)?\}", r"{\1}", path)


def test_routes_and_document_agree() -> None:
    registered = {route_key(r.method, r.path) for r in routes() if r.method != "HEAD"}
    documented = {route_key(m, p) for p, m, _ in operations(load_document()) if m != "head"}
    assert sorted(registered - documented) == [], "routes missing from the document"
    assert sorted(documented - registered) == [], "documented operations that are not routes"


async def test_served_document_is_the_file(make_service: ServiceFactory, session: aiohttp.ClientSession) -> None:
    service = await make_service()
    async with session.get(url_of(service) + "/v1/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        served = await response.json()
    expected = load_document()
    expected["info"]["version"] = mwm.__version__
    assert served == expected
    assert openapi_document() == expected


# -- a real service, through every endpoint --------------------------------------------------------


async def test_every_endpoint_answers_as_documented(
    make_service: ServiceFactory,
    session: aiohttp.ClientSession,
    contract: Contract,
    tmp_path: Path,
    small_study: Any,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    service = await make_service(
        apps=[{"id": "ct", "command": SAMPLE_APP, "timeout": "200ms", "sinks": ["out", "pull", "broken"]}],
        sinks=[
            {"id": "out", "kind": "folder", "path": str(tmp_path / "out")},
            {"id": "pull", "kind": "pull"},
            {"id": "broken", "kind": "folder", "path": str(blocker / "results")},
        ],
        delivery={"max_attempts": 1},
    )
    api = Api(session, service, contract)
    files = [p.read_bytes() for p in small_study.paths]

    await api.get("/health")
    await api.get("/v1/openapi.json")

    # -- uploads: the study (multipart), a duplicate (single), then the failures -----------------
    answer = await api.upload(
        files, 200, headers={"X-Correlation-ID": "study-1", "X-Calling-AET": "SCANNER", "X-Called-AET": "MWM"}
    )
    assert answer["stored"] == len(files)
    assert {b["app_id"] for o in answer["instances"] for b in o.get("buckets", [])} == {"ct"}
    answer = await api.post("/v1/instances", 200, data=files[0], headers={"Content-Type": "application/dicom"})
    assert answer["instances"][0]["status"] == "duplicate"
    answer = await api.post("/v1/instances", 400, data=b"not dicom", headers={"Content-Type": "application/dicom"})
    assert answer["error"] == "rejected"
    answer = await api.post("/v1/instances", 415, data=b"hello", headers={"Content-Type": "text/plain"})
    assert answer["error"] == "unsupported_media_type"
    answer = await api.upload([b"hello"], 415, part_type="text/plain")
    assert answer["error"] == "rejected" and answer["rejected"] == 1
    mixed = multipart([files[1]])
    mixed.append(b"hello", {"Content-Type": "text/plain"})
    answer = await api.post(
        "/v1/instances",
        202,
        data=mixed,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary="{mixed.boundary}"'},
    )
    assert (answer["duplicate"], answer["rejected"]) == (1, 1)
    await api.post("/v1/instances", 400, data=multipart([files[0]]))  # no type="application/dicom"
    answer = await api.post(
        "/v1/instances",
        400,
        data=files[0],
        headers={"Content-Type": "application/dicom", "X-Correlation-ID": "x" * 129},
    )
    assert answer["error"] == "bad_request"
    answer = await api.post(
        "/v1/instances",
        404,
        params=[("app", "ct"), ("app", "nope")],
        data=files[0],
        headers={"Content-Type": "application/dicom"},
    )
    assert answer["error"] == "not_found"

    # -- the study's job runs and succeeds --------------------------------------------------------------
    jobs = await api.wait_for("/v1/jobs", lambda d: d["jobs"], params={"app": "ct"})
    job_id = jobs["jobs"][0]["id"]
    job = await api.wait_for(
        f"/v1/jobs/{job_id}", lambda d: d["state"] in ("succeeded", "failed", "cancelled"), timeout=50
    )
    assert job["state"] == "succeeded", job
    assert job["correlation_id"] == "study-1"
    assert sum(s["instance_count"] for s in job["series"]) == len(files)
    assert job["results"], job
    await api.get("/v1/jobs", params={"state": "succeeded", "limit": "5"})
    log_text = await api.get(f"/v1/jobs/{job_id}/log")
    assert isinstance(log_text, str)
    await api.get(f"/v1/jobs/{job_id}/log", params={"tail": "3"})

    # -- results: list, download ----------------------------------------------------------------------
    listed = await api.get("/v1/results")
    assert listed["results"]
    by_job = await api.get("/v1/results", params={"job": str(job_id), "limit": "10"})
    result = next(r for r in by_job["results"] if r["media_type"] == "application/dicom")
    content = await api.get(f"/v1/results/{result['id']}")
    assert len(content) == result["size"]
    assert api.last_headers["Content-Type"] == result["media_type"]
    assert api.last_headers["X-Job-ID"] == str(job_id)
    assert api.last_headers["X-Correlation-ID"] == "study-1"
    assert "attachment" in api.last_headers["Content-Disposition"]

    # -- sinks and deliveries -------------------------------------------------------------------------------
    await api.wait_for(
        "/v1/deliveries",
        lambda d: len(d["deliveries"]) >= len(job["results"]),
        params={"sink": "out", "state": "delivered"},
    )
    failed = await api.wait_for(
        "/v1/deliveries", lambda d: d["deliveries"], params={"sink": "broken", "state": "failed"}
    )
    await api.get("/v1/deliveries")
    sinks = await api.get("/v1/sinks")
    assert {s["id"] for s in sinks["sinks"]} == {"out", "pull", "broken"}
    await api.get("/v1/sinks/out")
    pull = await api.get("/v1/sinks/pull")
    assert pull["pulled"] is True
    queued = await api.get("/v1/sinks/pull/results", params={"limit": "100", "after": "0"})
    assert {r["id"] for r in queued["results"]} == {r["id"] for r in job["results"]}
    held = queued["results"][0]
    await api.get(held["download"])
    answer = await api.post(held["ack"], json={"sink": "pull"})
    assert answer == {"result_id": held["id"], "acknowledged": 1}
    answer = await api.post(held["ack"])
    assert answer["acknowledged"] == 0
    await api.post(held["ack"], 400, json={"sink": "out"})
    await api.post(held["ack"], 400, data=b"{", headers={"Content-Type": "application/json"})
    await api.post(held["ack"], 400, json=["pull"])
    await api.post("/v1/results/999999/ack", 404)
    await api.get("/v1/results/999999", 404)
    await api.get("/v1/sinks/out/results", 400)
    await api.get("/v1/sinks/pull/results", 400, params={"after": "-1"})
    await api.get("/v1/sinks/nope", 404)
    await api.get("/v1/sinks/nope/results", 404)

    failed_id = failed["deliveries"][0]["id"]
    retried = await api.post(f"/v1/deliveries/{failed_id}/retry")
    assert retried["state"] in ("pending", "failed")  # the sink may already have failed it again
    delivered = await api.get("/v1/deliveries", params={"state": "delivered", "limit": "1"})
    await api.post(f"/v1/deliveries/{delivered['deliveries'][0]['id']}/retry", 409)
    await api.post("/v1/deliveries/999999/retry", 404)

    # -- applications ---------------------------------------------------------------------------------
    apps = await api.get("/v1/apps")
    assert [a["id"] for a in apps["apps"]] == ["ct"]
    ct = await api.get("/v1/apps/ct")
    assert ct["origin"] == "config" and ct["command"] == SAMPLE_APP
    slow = {"id": "slow", "command": SLEEPER, "timeout": "1h", "max_attempts": 1, "match": {"modality": ["XX"]}}
    created = await api.post("/v1/apps", 201, json=slow)
    assert created["origin"] == "api" and created["timeout"] == 3600
    await api.post("/v1/apps", 409, json=slow)
    await api.post("/v1/apps", 400, json={"id": "bad", "command": SLEEPER, "max_parallel": 0})
    await api.post("/v1/apps", 400, json={"id": "bad", "command": SLEEPER, "sinks": ["nowhere"]})
    await api.post("/v1/apps", 400, json={"id": "bad id!", "command": SLEEPER})
    await api.post("/v1/apps", 400, json={"id": "bad", "engine": "no-such-engine"})
    await api.post("/v1/apps", 400, json={"id": "bad"})  # the local engine needs a command
    await api.post("/v1/apps", 400, data=b"{not json", headers={"Content-Type": "application/json"})
    await api.post("/v1/apps", 400, json=[slow])
    big = json.dumps({"id": "big", "command": SLEEPER, "description": "x" * (1 << 20)}).encode()
    await api.post("/v1/apps", 413, data=io.BytesIO(big), headers={"Content-Type": "application/json"})
    updated = await api.call("PUT", "/v1/apps/slow", 200, json={**slow, "description": "sleeps"})
    assert updated["description"] == "sleeps"
    await api.call("PUT", "/v1/apps/slow", 400, json={**slow, "id": "other"})
    await api.call("PUT", "/v1/apps/ct", 409, json={"command": SAMPLE_APP})
    await api.call("PUT", "/v1/apps/missing", 404, json={"command": SLEEPER})
    await api.call("DELETE", "/v1/apps/ct", 409)
    await api.call("DELETE", "/v1/apps/missing", 404)
    await api.get("/v1/apps/missing", 404)
    await api.post("/v1/apps", 201, json={"id": "scratch", "command": SLEEPER, "enabled": False})
    await api.call("DELETE", "/v1/apps/scratch", 204)

    # -- buckets: one held open, closed by request -----------------------------------------------------
    extra = synthetic.generate_study(
        tmp_path / "extra", series_count=1, instances_per_series=1, rows=16, cols=16, seed=99
    )
    answer = await api.post(
        "/v1/instances",
        200,
        params=[("app", "slow")],
        data=extra.paths[0].read_bytes(),
        headers={"Content-Type": "application/dicom", "X-Correlation-ID": "extra-1"},
    )
    assert answer["instances"][0]["status"] == "stored"
    bucket_id = answer["instances"][0]["buckets"][0]["id"]
    open_buckets = await api.get("/v1/buckets")
    assert bucket_id in {b["id"] for b in open_buckets["buckets"]}
    await api.get("/v1/buckets", params={"state": "closed", "app": "ct", "limit": "10"})
    bucket = await api.get(f"/v1/buckets/{bucket_id}")
    assert bucket["state"] == "open" and bucket["remaining_seconds"] > 0
    closed = await api.post(f"/v1/buckets/{bucket_id}/close")
    slow_job = closed["job"]["id"]
    await api.post(f"/v1/buckets/{bucket_id}/close", 409)
    await api.post("/v1/buckets/999999/close", 404)
    await api.get("/v1/buckets/999999", 404)
    await api.get("/v1/buckets/abc", 404)
    closed_bucket = await api.get(f"/v1/buckets/{bucket_id}")
    assert closed_bucket["remaining_seconds"] is None and closed_bucket["closed_at"]

    # -- jobs: cancel and retry ----------------------------------------------------------------------
    cancelled = await api.post(f"/v1/jobs/{slow_job}/cancel")
    assert cancelled["state"] == "cancelled"
    await api.post(f"/v1/jobs/{slow_job}/cancel", 409)
    retried = await api.post(f"/v1/jobs/{slow_job}/retry")
    assert retried["state"] in ("scheduled", "launching", "running")
    await api.post(f"/v1/jobs/{slow_job}/cancel")
    await api.post(f"/v1/jobs/{job_id}/retry", 409)
    await api.post(f"/v1/jobs/{job_id}/cancel", 409)
    for suffix in ("", "/log"):
        await api.get(f"/v1/jobs/999999{suffix}", 404)
    for action in ("cancel", "retry"):
        await api.post(f"/v1/jobs/999999/{action}", 404)
    await api.get(f"/v1/jobs/{slow_job}")

    # -- instances, events, statistics ----------------------------------------------------------------
    instances = await api.get("/v1/instances")
    assert len(instances["instances"]) == len(files) + 1
    await api.get("/v1/instances", params={"study": small_study.study_uid, "limit": "2", "after": "1"})
    instance = await api.get(f"/v1/instances/{instances['instances'][0]['sop_instance_uid']}")
    assert instance["correlation_id"] == "study-1" and instance["calling_aet"] == "SCANNER"
    await api.get("/v1/instances/1.2.3.4", 404)
    events = await api.get("/v1/events")
    assert events["events"]
    await api.get("/v1/events", params={"job": str(job_id), "after": "0", "limit": "50"})
    stats = await api.get("/v1/stats")
    assert stats["jobs"]["succeeded"] >= 1
    assert (await api.get("/v1/whoami")) == {"role": "admin"}
    metrics_text = await api.get("/metrics")
    assert 'mwm_jobs{state="succeeded"}' in metrics_text
    async with session.get(api.base + "/v1/events/stream", params={"after": "0"}) as response:
        contract.check_response("get", "/v1/events/stream", response.status, response.content_type, b"")
        lines: list[str] = []
        while sum(line.startswith("id: ") for line in lines) < 3:
            lines.append((await response.content.readline()).decode())
    streamed = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    for event in streamed:
        contract.validate("#/components/schemas/Event", event)
    assert [e["id"] for e in streamed] == [e["id"] for e in events["events"][: len(streamed)]]

    # -- malformed query parameters ---------------------------------------------------------------------
    bad_queries = [
        ("/v1/instances", {"limit": "0"}),
        ("/v1/instances", {"after": "x"}),
        ("/v1/buckets", {"state": "ajar"}),
        ("/v1/buckets", {"limit": "10001"}),
        ("/v1/jobs", {"state": "done"}),
        ("/v1/results", {"job": "one"}),
        ("/v1/deliveries", {"state": "lost"}),
        ("/v1/events", {"after": "-1"}),
        ("/v1/events", {"job": "x"}),
        (f"/v1/jobs/{job_id}/log", {"tail": "-1"}),
    ]
    for path, params in bad_queries:
        error = await api.get(path, 400, params=params)
        assert error["error"] == "bad_request"

    # -- stopping: health and uploads say so ------------------------------------------------------------
    service.accepting = False
    try:
        health = await api.get("/health", 503)
        assert health["status"] == "unavailable"
        answer = await api.post("/v1/instances", 503, data=files[0], headers={"Content-Type": "application/dicom"})
        assert answer["error"] == "shutting_down"
    finally:
        service.accepting = True

    # -- a result whose stored file is gone -------------------------------------------------------------
    row = await service.db.get_result(result["id"])
    assert row is not None
    stored = service.storage.local_path(row["storage_key"])
    assert stored is not None
    stored.unlink()
    answer = await api.get(f"/v1/results/{result['id']}", 507)
    assert answer["error"] == "storage_unavailable"

    # Every operation was exercised, and succeeded at least once.
    succeeded = {(m, t) for m, t, status in contract.seen if status < 300}
    missing = sorted({(m, p) for p, m, _ in operations(contract.document)} - succeeded)
    assert missing == [], f"operations never exercised successfully: {missing}"


async def test_upload_limits(
    make_service: ServiceFactory, session: aiohttp.ClientSession, contract: Contract, small_study: Any
) -> None:
    service = await make_service(server={"max_upload_size": "4KiB"})
    api = Api(session, service, contract)
    data = small_study.paths[0].read_bytes()
    assert len(data) > 4096
    error = await api.post("/v1/instances", 413, data=data, headers={"Content-Type": "application/dicom"})
    assert error["error"] == "payload_too_large"
    error = await api.upload([data], 413)
    assert error["error"] == "payload_too_large"

    async def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for start in range(0, len(data), 1024):
            yield data[start : start + 1024]

    error = await api.post("/v1/instances", 413, data=chunks(), headers={"Content-Type": "application/dicom"})
    assert error["error"] == "payload_too_large"


async def test_empty_multipart_upload_is_rejected(
    make_service: ServiceFactory, session: aiohttp.ClientSession, contract: Contract
) -> None:
    service = await make_service()
    answer = await Api(session, service, contract).upload([], 400)
    assert answer["error"] == "failed" and answer["message"] == "no instance in the upload"


async def test_tokens(make_service: ServiceFactory, session: aiohttp.ClientSession, contract: Contract) -> None:
    service = await make_service(
        server={"tokens": [{"token": READ_TOKEN, "role": "read"}, {"token": ADMIN_TOKEN, "role": "admin"}]}
    )
    api = Api(session, service, contract)
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    await api.get("/health")
    await api.get("/v1/openapi.json")
    error = await api.get("/v1/jobs", 401)
    assert error["error"] == "unauthorized"
    await api.get("/v1/stats", 401, headers={"Authorization": "Bearer not-a-valid-token-at-all"})
    await api.get("/v1/stats", headers=read)
    await api.get("/v1/apps", headers=admin)
    error = await api.post("/v1/apps", 403, json={"id": "x", "command": SLEEPER}, headers=read)
    assert error["error"] == "forbidden"
    await api.call("DELETE", "/v1/apps/x", 403, headers=read)
    await api.post("/v1/instances", 403, data=b"", headers={**read, "Content-Type": "application/dicom"})
    await api.post("/v1/instances", 401, data=b"", headers={"Content-Type": "application/dicom"})
    await api.post("/v1/apps", 201, json={"id": "x", "command": SLEEPER}, headers=admin)
