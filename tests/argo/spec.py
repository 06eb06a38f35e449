"""The Argo Server's published API description, made strict, and checks of requests and answers against it.

The Swagger 2.0 file is read from ``../shared/argo/`` beside the project; where it is absent, the
definitions and paths are rebuilt from the models of the ``argo-workflows`` package (generated
from the same file). Every object schema gets ``additionalProperties: false`` where it says
nothing, so a misspelt field is an error rather than silently ignored.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC_FILE = ROOT.parent / "shared" / "argo" / "swagger-v3.7.18.json"
REF_PREFIX = "#/definitions/"


@functools.cache
def load_spec() -> dict[str, Any]:
    """The published description: the file when present, else rebuilt from the ``argo-workflows`` package."""
    if SPEC_FILE.is_file():
        return json.loads(SPEC_FILE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    from .package_spec import spec_from_package

    spec = spec_from_package()
    if spec is None:
        pytest.skip(f"no Argo API description: {SPEC_FILE} is absent and the argo-workflows package is not installed")
    return spec


def strict(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema without ``additionalProperties`` forbids extra keys."""
    schema = copy.deepcopy(schema)
    _tighten(schema)
    return schema


def _tighten(node: Any) -> None:
    if not isinstance(node, dict):
        return
    if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
        node["additionalProperties"] = False
    for child in (node.get("properties") or {}).values():
        _tighten(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _tighten(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for child in node.get(key) or ():
            _tighten(child)


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    operation_id: str
    parameters: tuple[Mapping[str, Any], ...]
    responses: Mapping[str, Any]

    def body_schema(self) -> Mapping[str, Any] | None:
        for p in self.parameters:
            if p.get("in") == "body":
                return p["schema"]  # type: ignore[no-any-return]
        return None

    def query(self) -> dict[str, Mapping[str, Any]]:
        return {p["name"]: p for p in self.parameters if p.get("in") == "query"}


class Api:
    """Routes and validators of a Swagger 2.0 description, made strict."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.definitions = {name: strict(schema) for name, schema in spec["definitions"].items()}
        self.operations: list[Operation] = []
        for template, item in spec["paths"].items():
            shared = item.get("parameters", [])
            pattern = re.compile(_named_groups(template))
            for method, op in item.items():
                if method == "parameters":
                    continue
                self.operations.append(
                    Operation(
                        method=method.upper(),
                        template=template,
                        pattern=pattern,
                        operation_id=op.get("operationId", ""),
                        parameters=tuple([*shared, *op.get("parameters", [])]),
                        responses=op.get("responses", {}),
                    )
                )
        # Literal segments win over parameters ("/{ns}/lint" before "/{ns}/{name}").
        self.operations.sort(key=lambda o: (o.template.count("{"), -len(o.template)))

    def match(self, method: str, path: str) -> tuple[Operation | None, dict[str, str], bool]:
        """(operation, path parameters, whether the path exists with another method)."""
        path_known = False
        for op in self.operations:
            m = op.pattern.match(path)
            if m is None:
                continue
            path_known = True
            if op.method == method:
                return op, {_unmangle(k): v for k, v in m.groupdict().items()}, True
        return None, {}, path_known

    @functools.cache  # noqa: B019 - one Api per test session
    def validator(self, ref: str) -> jsonschema.Draft4Validator:
        schema = {"$ref": ref, "definitions": self.definitions}
        return jsonschema.Draft4Validator(schema)

    def schema_errors(self, schema: Mapping[str, Any], value: Any) -> list[str]:
        if "$ref" in schema and len(schema) == 1:
            validator = self.validator(schema["$ref"])
        else:
            validator = jsonschema.Draft4Validator({**strict(dict(schema)), "definitions": self.definitions})
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message[:300]}"
            for e in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
        ][:20]

    def query_errors(self, op: Operation, query: Mapping[str, list[str]]) -> list[str]:
        declared = op.query()
        errors = []
        for name, values in query.items():
            param = declared.get(name)
            if param is None:
                errors.append(f"query parameter {name!r} is not in the API description of {op.operation_id}")
                continue
            if param.get("type") != "array" and len(values) > 1:
                errors.append(f"query parameter {name!r} given {len(values)} times")
            for value in values:
                problem = _type_problem(param, value)
                if problem:
                    errors.append(f"query parameter {name!r}: {problem}")
        return errors

    def response_errors(self, op: Operation, status: int, body: Any) -> list[str]:
        response = op.responses.get(str(status)) or op.responses.get("default")
        if response is None:
            return [f"{op.operation_id} has no response {status} in the API description"]
        schema = response.get("schema")
        return self.schema_errors(schema, body) if schema else []


def _named_groups(template: str) -> str:
    out = "^"
    for part in re.split(r"(\{[^}]+\})", template):
        if part.startswith("{") and part.endswith("}"):
            out += f"(?P<{_mangle(part[1:-1])}>[^/]+)"
        else:
            out += re.escape(part)
    return out + "$"


def _mangle(name: str) -> str:
    return "p_" + name.replace(".", "__")


def _unmangle(group: str) -> str:
    return group[2:].replace("__", ".")


def _type_problem(param: Mapping[str, Any], value: str) -> str | None:
    kind, fmt = param.get("type"), param.get("format")
    if kind == "boolean" and value not in ("true", "false"):
        return f"expected true or false, got {value!r}"
    if (kind == "integer" or fmt in ("int64", "int32")) and not re.fullmatch(r"-?\d+", value):
        return f"expected an integer, got {value!r}"
    if "enum" in param and value not in param["enum"]:
        return f"expected one of {param['enum']}, got {value!r}"
    return None
