"""The Argo Server's API description rebuilt from the models of the ``argo-workflows`` package.

Used only where ``../shared/argo/swagger-v3.7.18.json`` is absent. The package is generated from
that file, so its models carry the same fields, types and required properties; this turns them
back into Swagger 2.0 definitions and paths of the calls mwm makes. Definitions of the Argo
kinds keep their published names (``io.argoproj.workflow.v1alpha1.Workflow``); the Kubernetes
ones are named after their model class.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import re
from typing import Any

PREFIXES = {
    "IoArgoprojWorkflowV1alpha1": "io.argoproj.workflow.v1alpha1.",
    "GrpcGatewayRuntime": "grpc.gateway.runtime.",
    "GoogleProtobuf": "google.protobuf.",
}
SERVICES = ("workflow_service_api.WorkflowServiceApi",)
_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    datetime.datetime: {"type": "string", "format": "date-time"},
    datetime.date: {"type": "string", "format": "date"},
}


def definition_name(cls: type) -> str:
    name = cls.__name__
    for prefix, dotted in PREFIXES.items():
        if name.startswith(prefix):
            return dotted + name[len(prefix) :]
    return name


def spec_from_package() -> dict[str, Any] | None:
    """A Swagger 2.0 dict, or ``None`` when the package is not installed."""
    try:
        models = importlib.import_module("argo_workflows.models")
        api_client = importlib.import_module("argo_workflows.api_client")
    except ImportError:
        return None
    from argo_workflows.model_utils import ModelNormal, ModelSimple

    definitions: dict[str, Any] = {}
    for cls in vars(models).values():
        generated = inspect.isclass(cls) and issubclass(cls, ModelNormal | ModelSimple)
        if generated and cls not in (ModelNormal, ModelSimple):
            definitions[definition_name(cls)] = _definition(cls, ModelSimple)
    paths: dict[str, Any] = {}
    client = api_client.ApiClient()
    for dotted in SERVICES:
        module_name, class_name = dotted.rsplit(".", 1)
        service = getattr(importlib.import_module(f"argo_workflows.api.{module_name}"), class_name)(client)
        for attribute, endpoint in vars(service).items():
            if attribute.endswith("_endpoint"):
                path, method, operation = _operation(endpoint, class_name)
                paths.setdefault(path, {})[method] = operation
    return {"swagger": "2.0", "paths": paths, "definitions": definitions}


def _definition(cls: Any, simple: type) -> dict[str, Any]:
    if issubclass(cls, simple):
        return _schema(_types(cls)["value"])
    types = _types(cls)
    names = cls.attribute_map
    properties = {names[attr]: _schema(kinds) for attr, kinds in types.items()}
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    signature = inspect.signature(cls._from_openapi_data)
    required = [
        names[p.name]
        for p in signature.parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("cls", "self") and p.name in names
    ]
    if required:
        schema["required"] = required
    return schema


def _schema(kinds: tuple[Any, ...]) -> dict[str, Any]:
    if len(kinds) != 1:
        return {}  # any JSON value
    kind = kinds[0]
    if isinstance(kind, list):
        return {"type": "array", "items": _schema(tuple(kind))}
    if isinstance(kind, dict):
        ((_key, value),) = kind.items()
        return {"type": "object", "additionalProperties": _schema(value)}
    if kind in _SCALARS:
        return dict(_SCALARS[kind])
    if inspect.isclass(kind) and hasattr(kind, "attribute_map"):
        return {"$ref": f"#/definitions/{definition_name(kind)}"}
    return {}


def _operation(endpoint: Any, service: str) -> tuple[str, str, dict[str, Any]]:
    settings, params = endpoint.settings, endpoint.params_map
    parameters = []
    for attr in params["all"]:
        location = endpoint.location_map.get(attr)
        if location is None:
            continue
        name = endpoint.attribute_map.get(attr, attr)
        kinds = endpoint.openapi_types[attr]
        if location == "body":
            parameters.append({"name": "body", "in": "body", "required": True, "schema": _schema(kinds)})
            continue
        parameter = {"name": name, "in": location, **_schema(kinds)}
        if parameter.get("type") == "array":
            parameter["items"] = {"type": "string"}
        if attr in params["required"]:
            parameter["required"] = True
        parameters.append(parameter)
    response = settings.get("response_type")
    responses: dict[str, Any] = {"default": {"schema": {"$ref": "#/definitions/grpc.gateway.runtime.Error"}}}
    if response:
        schema = _schema(response)
        if re.match(r"^StreamResultOf", response[0].__name__):
            inner = _types(response[0])
            schema = {"type": "object", "properties": {k: _schema(v) for k, v in inner.items()}}
        responses["200"] = {"schema": schema}
    operation_id = f"{service.removesuffix('Api')}_{_camel(settings['operation_id'])}"
    return (
        settings["endpoint_path"],
        settings["http_method"].lower(),
        {
            "operationId": operation_id,
            "parameters": parameters,
            "responses": responses,
        },
    )


def _types(cls: Any) -> dict[str, Any]:
    """A model's ``openapi_types`` (a cached class property in the generated code)."""
    types = cls.openapi_types
    return types() if callable(types) else types  # type: ignore[no-any-return]


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))
