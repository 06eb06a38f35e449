"""What mwm asks of Argo Workflows: the settings, the per-application options, the Workflow manifest.

Everything here is pure (no I/O), so the manifest and the reading of a workflow's status are
tested with tables; ``argo.py`` does the talking.

A job's attempt runs as one Workflow named ``<instance>-<job>-<attempt>`` whose single container
template gets the job's instances as an S3 input artifact (a key prefix unpacked into
``input_path``) and uploads ``output_path`` as an S3 output artifact, file by file
(``archive: none``), under the job's output prefix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ..errors import ConfigError
from ..options import Duration, non_negative, positive
from . import EngineStatus

MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "mwm.instance"
LABEL_JOB = "mwm.job-id"
LABEL_ATTEMPT = "mwm.attempt"
LABEL_APP = "mwm.app-id"
LABEL_CORRELATION = "mwm.correlation-id"
#: Set by the Argo controller once a workflow has finished.
LABEL_COMPLETED = "workflows.argoproj.io/completed"
TEMPLATE = "main"
CONTAINER = "main"
INPUT_ARTIFACT = "input"
OUTPUT_ARTIFACT = "output"
OUTPUT_VOLUME = "mwm-output"
#: Parameters a referenced WorkflowTemplate receives (see docs/argo.md).
PARAM_OUTPUT_KEY = "mwm-output-key"
PARAM_JOB = "mwm-job-id"
PARAM_CORRELATION = "mwm-correlation-id"
RUNNING_PHASES = ("", "Pending", "Running")
FAILED_PHASES = ("Failed", "Error")

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INSTANCE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


# -- checks ---------------------------------------------------------------------------------------


def _check_url(value: str, where: str) -> None:
    if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", value):
        raise ConfigError(
            f"{where}: expected the Argo Server's URL such as 'https://argo.example.org:2746', got {value!r}"
        )


def _check_dns_name(value: str | None, where: str) -> None:
    if value is not None and not _DNS_NAME.match(value):
        raise ConfigError(f"{where}: {value!r} is not a valid Kubernetes name (lower-case letters, digits, '-')")


def _check_dns_names(values: tuple[str, ...], where: str) -> None:
    for i, value in enumerate(values):
        _check_dns_name(value, f"{where}[{i}]")


def _check_instance(value: str, where: str) -> None:
    if not _INSTANCE.match(value):
        raise ConfigError(f"{where}: {value!r} must be 1 to 30 lower-case letters, digits or '-'")


def _check_quantity(value: str | int | float | None, where: str) -> None:
    if value is not None and not _QUANTITY.match(quantity(value)):
        raise ConfigError(f"{where}: {value!r} is not a Kubernetes quantity such as '500m', '2', '4Gi'")


def _check_resource_name(value: str, where: str) -> None:
    if not _RESOURCE_NAME.match(value):
        raise ConfigError(f"{where}: {value!r} is not a Kubernetes resource name such as 'nvidia.com/gpu'")


def _check_env(value: Mapping[str, str], where: str) -> None:
    for name in value:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{where}.{name}: not a valid environment variable name")


def _check_path(value: str | None, where: str) -> None:
    if value is not None and (not value.startswith("/") or value.rstrip("/") == ""):
        raise ConfigError(f"{where}: expected an absolute path in the container, got {value!r}")


def quantity(value: str | int | float) -> str:
    """A quantity as Kubernetes writes it (numbers from TOML become strings)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRef:
    """A key of a Kubernetes Secret in the workflow's namespace."""

    name: str = field(metadata={"check": _check_dns_name})
    key: str


@dataclass(frozen=True)
class ArtifactRepository:
    """How the cluster reaches the bucket mwm stores in (``[engines.argo.artifact_repository]``).

    Without this table the artifacts name only their keys, and Argo uses the namespace's default
    artifact repository, which must then be the same bucket.
    """

    s3_endpoint: str  # host[:port], as Argo writes it, without a scheme
    s3_bucket: str | None = None  # default: the storage's bucket
    s3_insecure: bool = False  # plain HTTP
    s3_region: str | None = None
    s3_access_key_secret: SecretRef | None = None
    s3_secret_key_secret: SecretRef | None = None
    #: Use the pod's own cloud identity (e.g. IRSA on EKS) instead of key secrets.
    s3_use_sdk_creds: bool = False

    def __post_init__(self) -> None:
        if "://" in self.s3_endpoint or "/" in self.s3_endpoint:
            raise ConfigError(
                "engines.argo.artifact_repository.s3_endpoint: write host[:port] without a scheme, "
                f"such as 'minio.storage:9000', got {self.s3_endpoint!r}"
            )
        if (self.s3_access_key_secret is None) != (self.s3_secret_key_secret is None):
            raise ConfigError(
                "engines.argo.artifact_repository.s3_secret_key_secret: s3_access_key_secret and "
                "s3_secret_key_secret go together"
            )


@dataclass(frozen=True)
class ArgoSettings:
    """The ``[engines.argo]`` table: how mwm reaches the Argo Server and what every workflow gets."""

    url: str = field(metadata={"check": _check_url})
    token: str | None = None
    #: Read again whenever it changes, so a rotated token is picked up without a restart.
    token_file: Path | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    namespace: str = field(default="argo", metadata={"check": _check_dns_name})
    #: Names this mwm's workflows (``<instance>-<job>-<attempt>``) and labels them; give each mwm
    #: sharing a namespace its own.
    instance: str = field(default="mwm", metadata={"check": _check_instance})
    poll_interval: Duration = field(default=Duration(5.0), metadata={"check": positive})
    request_timeout: Duration = field(default=Duration(30.0), metadata={"check": positive})
    max_concurrent_requests: int = field(default=8, metadata={"check": positive})
    #: Tries per request on connection errors, 5xx and 429, with exponential back-off.
    request_attempts: int = field(default=5, metadata={"check": positive})
    retry_backoff: Duration = field(default=Duration(0.5), metadata={"check": positive})
    retry_backoff_max: Duration = field(default=Duration(8.0), metadata={"check": positive})
    delete_finished: bool = True
    #: Argo deletes a finished workflow after this long even if mwm could not (``ttlStrategy``).
    ttl_after_finished: Duration = field(default=Duration(86400.0), metadata={"check": positive})
    pod_gc_strategy: Literal["OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess"] = (
        "OnWorkflowCompletion"
    )
    #: Pods stay this long after completion so their logs can be read.
    pod_gc_delay: Duration = field(default=Duration(600.0), metadata={"check": non_negative})
    artifact_repository: ArtifactRepository | None = None
    service_account: str | None = field(default=None, metadata={"check": _check_dns_name})
    staging_concurrency: int = field(default=16, metadata={"check": positive})
    log_limit_bytes: int = field(default=4 * 2**20, metadata={"check": positive})

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ConfigError("engines.argo.token_file: give either token or token_file, not both")


# -- per-application options ---------------------------------------------------------------------


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class ArgoOptions:
    """An application's keys for the Argo engine (in its ``[[apps]]`` table)."""

    image: str | None = None
    #: A WorkflowTemplate to run instead of an image (see docs/argo.md for what it receives).
    workflow_template: str | None = field(default=None, metadata={"check": _check_dns_name})
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), metadata={"check": _check_env})
    cpu_request: str | int | float | None = field(default=None, metadata={"check": _check_quantity})
    cpu_limit: str | int | float | None = field(default=None, metadata={"check": _check_quantity})
    memory_request: str | int | None = field(default=None, metadata={"check": _check_quantity})
    memory_limit: str | int | None = field(default=None, metadata={"check": _check_quantity})
    gpu: int = field(default=0, metadata={"check": non_negative})
    gpu_resource: str = field(default="nvidia.com/gpu", metadata={"check": _check_resource_name})
    node_selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    tolerations: tuple[Toleration, ...] = ()
    service_account: str | None = field(default=None, metadata={"check": _check_dns_name})
    priority_class: str | None = field(default=None, metadata={"check": _check_dns_name})
    image_pull_secrets: tuple[str, ...] = field(default=(), metadata={"check": _check_dns_names})
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    namespace: str | None = field(default=None, metadata={"check": _check_dns_name})
    input_path: str = field(default="/var/holoscan/input", metadata={"check": _check_path})
    output_path: str = field(default="/var/holoscan/output", metadata={"check": _check_path})
    model_path: str | None = field(default=None, metadata={"check": _check_path})

    def __post_init__(self) -> None:
        if (self.image is None) == (self.workflow_template is None):
            raise ConfigError("an application run by the argo engine needs either image or workflow_template")
        if self.workflow_template is not None and (self.command or self.args or self.env):
            raise ConfigError("command, args and env apply to an image; a workflow_template defines its own")


# -- names and labels ----------------------------------------------------------------------------


def workflow_name(instance: str, job_id: int, attempt: int) -> str:
    """The deterministic name of a job attempt's workflow: a re-sent create finds it, never a twin."""
    return f"{instance}-{job_id}-{attempt}"


def label_value(text: str) -> str:
    """``text`` made a valid Kubernetes label value (at most 63 of ``[A-Za-z0-9._-]``, alphanumeric ends)."""
    cleaned = _LABEL_VALUE_BAD.sub("-", text)[:63]
    return cleaned.strip("._-")


def labels(instance: str, job_id: int, attempt: int, app_id: str, correlation_id: str) -> dict[str, str]:
    return {
        MANAGED_BY: "mwm",
        LABEL_INSTANCE: instance,
        LABEL_JOB: str(job_id),
        LABEL_ATTEMPT: str(attempt),
        LABEL_APP: label_value(app_id),
        LABEL_CORRELATION: label_value(correlation_id),
    }


def active_selector(instance: str) -> str:
    """The label selector of this mwm's workflows that have not finished yet."""
    return f"{MANAGED_BY}=mwm,{LABEL_INSTANCE}={instance},{LABEL_COMPLETED}!=true"


# -- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowRequest:
    """One attempt of one job, as the manifest needs it."""

    name: str
    namespace: str
    job_id: int
    attempt: int
    app_id: str
    app_version: str
    correlation_id: str
    run_timeout: float
    bucket: str
    input_key: str  # S3 key prefix of the staged inputs (without a trailing '/')
    output_key: str  # S3 key prefix the outputs go to


def _s3_location(settings: ArgoSettings, bucket: str, key: str) -> dict[str, Any]:
    repo = settings.artifact_repository
    if repo is None:
        return {"key": key}  # the namespace's default artifact repository supplies the rest
    location: dict[str, Any] = {
        "endpoint": repo.s3_endpoint,
        "bucket": repo.s3_bucket or bucket,
        "insecure": repo.s3_insecure,
        "key": key,
    }
    if repo.s3_region:
        location["region"] = repo.s3_region
    if repo.s3_access_key_secret is not None and repo.s3_secret_key_secret is not None:
        location["accessKeySecret"] = {"name": repo.s3_access_key_secret.name, "key": repo.s3_access_key_secret.key}
        location["secretKeySecret"] = {"name": repo.s3_secret_key_secret.name, "key": repo.s3_secret_key_secret.key}
    if repo.s3_use_sdk_creds:
        location["useSDKCreds"] = True
    return location


def _environment(request: WorkflowRequest, options: ArgoOptions) -> list[dict[str, str]]:
    env = {
        "HOLOSCAN_INPUT_PATH": options.input_path,
        "HOLOSCAN_OUTPUT_PATH": options.output_path,
        "MONAI_INPUTPATH": options.input_path,
        "MONAI_OUTPUTPATH": options.output_path,
    }
    if options.model_path is not None:
        env["HOLOSCAN_MODEL_PATH"] = options.model_path
        env["MONAI_MODELPATH"] = options.model_path
    env["MWM_JOB_ID"] = str(request.job_id)
    env["MWM_CORRELATION_ID"] = request.correlation_id
    env.update(options.env)
    return [{"name": name, "value": value} for name, value in env.items()]


def _resources(options: ArgoOptions) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if options.cpu_request is not None:
        requests["cpu"] = quantity(options.cpu_request)
    if options.memory_request is not None:
        requests["memory"] = quantity(options.memory_request)
    if options.cpu_limit is not None:
        limits["cpu"] = quantity(options.cpu_limit)
    if options.memory_limit is not None:
        limits["memory"] = quantity(options.memory_limit)
    if options.gpu:
        limits[options.gpu_resource] = str(options.gpu)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _tolerations(values: Sequence[Toleration]) -> list[dict[str, Any]]:
    out = []
    for t in values:
        item: dict[str, Any] = {"operator": t.operator}
        if t.key is not None:
            item["key"] = t.key
        if t.value is not None:
            item["value"] = t.value
        if t.effect is not None:
            item["effect"] = t.effect
        if t.toleration_seconds is not None:
            item["tolerationSeconds"] = t.toleration_seconds
        out.append(item)
    return out


def _container_template(request: WorkflowRequest, settings: ArgoSettings, options: ArgoOptions) -> dict[str, Any]:
    assert options.image is not None
    container: dict[str, Any] = {"name": CONTAINER, "image": options.image}
    if options.image_pull_policy is not None:
        container["imagePullPolicy"] = options.image_pull_policy
    if options.command:
        container["command"] = list(options.command)
    if options.args:
        container["args"] = list(options.args)
    container["env"] = _environment(request, options)
    resources = _resources(options)
    if resources:
        container["resources"] = resources
    # An emptyDir at the output path: it exists and is writable whatever the image's user.
    container["volumeMounts"] = [{"name": OUTPUT_VOLUME, "mountPath": options.output_path}]
    return {
        "name": TEMPLATE,
        "inputs": {
            "artifacts": [
                {
                    "name": INPUT_ARTIFACT,
                    "path": options.input_path,
                    "s3": _s3_location(settings, request.bucket, request.input_key),
                }
            ]
        },
        "outputs": {
            "artifacts": [
                {
                    "name": OUTPUT_ARTIFACT,
                    "path": options.output_path,
                    "optional": True,  # an application may legitimately write nothing
                    "archive": {"none": {}},
                    "s3": _s3_location(settings, request.bucket, request.output_key),
                }
            ]
        },
        "container": container,
    }


def build_workflow(request: WorkflowRequest, settings: ArgoSettings, options: ArgoOptions) -> dict[str, Any]:
    """The ``Workflow`` object for one job attempt (the ``workflow`` of a ``WorkflowCreateRequest``)."""
    job_labels = labels(settings.instance, request.job_id, request.attempt, request.app_id, request.correlation_id)
    annotations = {LABEL_APP: request.app_id, LABEL_CORRELATION: request.correlation_id}
    if request.app_version:
        annotations["mwm.app-version"] = request.app_version
    spec: dict[str, Any] = {
        "activeDeadlineSeconds": max(1, math.ceil(request.run_timeout)),
        "ttlStrategy": {"secondsAfterCompletion": max(1, math.ceil(settings.ttl_after_finished))},
        "podGC": {"strategy": settings.pod_gc_strategy},
        "podMetadata": {"labels": job_labels},
    }
    if settings.pod_gc_delay:
        spec["podGC"]["deleteDelayDuration"] = f"{math.ceil(settings.pod_gc_delay)}s"
    service_account = options.service_account or settings.service_account
    if service_account:
        spec["serviceAccountName"] = service_account
    if options.priority_class:
        spec["podPriorityClassName"] = options.priority_class
    if options.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        spec["tolerations"] = _tolerations(options.tolerations)
    if options.workflow_template is not None:
        spec["workflowTemplateRef"] = {"name": options.workflow_template}
        spec["arguments"] = {
            "artifacts": [{"name": INPUT_ARTIFACT, "s3": _s3_location(settings, request.bucket, request.input_key)}],
            "parameters": [
                {"name": PARAM_OUTPUT_KEY, "value": request.output_key},
                {"name": PARAM_JOB, "value": str(request.job_id)},
                {"name": PARAM_CORRELATION, "value": request.correlation_id},
            ],
        }
    else:
        spec["entrypoint"] = TEMPLATE
        spec["volumes"] = [{"name": OUTPUT_VOLUME, "emptyDir": {}}]
        spec["templates"] = [_container_template(request, settings, options)]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "name": request.name,
            "namespace": request.namespace,
            "labels": job_labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


# -- reading a workflow's status -----------------------------------------------------------------


def _failed_nodes(status: Mapping[str, Any]) -> list[str]:
    """What the failed steps say ("main: Error (exit code 1)"), pods first."""
    nodes = status.get("nodes") or {}
    found = []
    for node in sorted(nodes.values(), key=lambda n: (n.get("type") != "Pod", str(n.get("startedAt") or ""))):
        if node.get("phase") in FAILED_PHASES and node.get("message"):
            found.append(f"{node.get('displayName') or node.get('name')}: {node['message']}")
    return found


def exit_code(status: Mapping[str, Any]) -> int | None:
    for node in (status.get("nodes") or {}).values():
        if node.get("type") == "Pod" and node.get("phase") in FAILED_PHASES:
            code = (node.get("outputs") or {}).get("exitCode")
            if code is not None and str(code).lstrip("-").isdigit():
                return int(code)
    return None


def workflow_status(workflow: Mapping[str, Any]) -> EngineStatus:
    """The engine status of a workflow object (as returned by the Argo Server)."""
    name = (workflow.get("metadata") or {}).get("name", "?")
    status = workflow.get("status") or {}
    phase = status.get("phase") or ""
    if phase in RUNNING_PHASES:
        return EngineStatus("running", message=phase or "Pending")
    if phase == "Succeeded":
        return EngineStatus("succeeded", exit_code=0)
    details = [status.get("message") or "", *_failed_nodes(status)]
    reason = "; ".join(dict.fromkeys(d for d in details if d)) or "no reason given"
    return EngineStatus("failed", message=f"workflow {name} {phase.lower()}: {reason}", exit_code=exit_code(status))
