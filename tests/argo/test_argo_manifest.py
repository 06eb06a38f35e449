"""The Argo engine's settings, options and manifests, checked against the Argo Server's API description."""

from __future__ import annotations

import pytest
from support import ROOT, base_config

from mwm.config import load_settings
from mwm.engines import EngineStatus
from mwm.engines.argo import parse_ref, retry_delay
from mwm.engines.argo_workflow import (
    ArgoOptions,
    ArgoSettings,
    WorkflowRequest,
    build_workflow,
    label_value,
    workflow_status,
)
from mwm.errors import ConfigError, EngineError
from mwm.options import build

from .fake_argo import filter_fields, parse_selector, selector_matches
from .spec import Api, load_spec

SAMPLE = ROOT / "samples" / "config" / "argo-s3.toml"
CREATE = {"$ref": "#/definitions/io.argoproj.workflow.v1alpha1.WorkflowCreateRequest"}


@pytest.fixture(scope="module")
def api() -> Api:
    return Api(load_spec())


def request(**changes):
    values = dict(
        name="mwm-7-2",
        namespace="mwm-jobs",
        job_id=7,
        attempt=2,
        app_id="ct seg/α",
        app_version="1.0",
        correlation_id="c" * 100,
        run_timeout=90.5,
        bucket="mwm",
        input_key="site/jobs/7/2/input",
        output_key="site/jobs/7/2/output",
    )
    values.update(changes)
    return WorkflowRequest(**values)


SETTINGS = {
    "url": "https://argo.example.org:2746",
    "token": "t",
    "artifact_repository": {
        "s3_endpoint": "minio:9000",
        "s3_access_key_secret": {"name": "s3", "key": "a"},
        "s3_secret_key_secret": {"name": "s3", "key": "b"},
    },
}


def test_the_sample_configuration_is_valid(tmp_path) -> None:
    tokens = tmp_path / "tokens"  # the sample names a file of the machine it runs on
    tokens.write_text("admin 0123456789abcdef0123\n")
    settings = load_settings(SAMPLE, environ={"MWM_SERVER_TOKENS_FILE": str(tokens)})
    assert settings.storage.kind == "s3"
    engine = build(ArgoSettings, settings.engines["argo"], "engines.argo")
    assert engine.artifact_repository is not None and engine.artifact_repository.s3_bucket == "mwm"
    for app in settings.apps:
        assert app.engine == "argo"
        build(ArgoOptions, app.engine_options, "apps")
    pytest.importorskip("aiobotocore")
    from mwm.storage.s3 import S3Options

    build(S3Options, {k: v for k, v in settings.storage.options.items()}, "storage")


@pytest.mark.parametrize(
    "options",
    [
        {"image": "registry/app:1"},
        {
            "image": "registry/app:1",
            "command": ["python", "-m", "app"],
            "args": ["--fast"],
            "env": {"A": "1"},
            "cpu_request": 0.5,
            "cpu_limit": 2,
            "memory_request": "1Gi",
            "memory_limit": "4Gi",
            "gpu": 2,
            "gpu_resource": "amd.com/gpu",
            "node_selector": {"gpu": "yes"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "toleration_seconds": 60}],
            "service_account": "runner",
            "priority_class": "high",
            "image_pull_secrets": ["regcred"],
            "image_pull_policy": "IfNotPresent",
            "namespace": "other",
            "model_path": "/opt/models",
        },
        {"workflow_template": "seg-template"},
    ],
)
@pytest.mark.parametrize("repository", [True, False])
def test_manifests_are_valid_create_requests(api, options, repository) -> None:
    table = dict(SETTINGS) if repository else {k: v for k, v in SETTINGS.items() if k != "artifact_repository"}
    settings = build(ArgoSettings, table, "engines.argo")
    workflow = build_workflow(request(), settings, build(ArgoOptions, options, "apps[0]"))
    assert api.schema_errors(CREATE, {"namespace": "mwm-jobs", "workflow": workflow}) == []
    labels = workflow["metadata"]["labels"]
    assert all(len(v) <= 63 for v in labels.values())
    assert labels["mwm.app-id"] == "ct-seg" and labels["mwm.attempt"] == "2"
    assert workflow["metadata"]["annotations"]["mwm.correlation-id"] == "c" * 100
    assert workflow["spec"]["activeDeadlineSeconds"] == 91


def test_a_full_manifest() -> None:
    settings = build(ArgoSettings, SETTINGS, "engines.argo")
    options = build(ArgoOptions, {"image": "r/app:1", "gpu": 1, "cpu_limit": 2, "model_path": "/m"}, "apps[0]")
    spec = build_workflow(request(), settings, options)["spec"]
    (template,) = spec["templates"]
    assert template["container"]["resources"] == {"limits": {"cpu": "2", "nvidia.com/gpu": "1"}}
    env = {e["name"]: e["value"] for e in template["container"]["env"]}
    assert env["HOLOSCAN_MODEL_PATH"] == env["MONAI_MODELPATH"] == "/m"
    assert env["MWM_JOB_ID"] == "7"
    s3 = template["inputs"]["artifacts"][0]["s3"]
    assert s3 == {
        "endpoint": "minio:9000",
        "bucket": "mwm",
        "insecure": False,
        "key": "site/jobs/7/2/input",
        "accessKeySecret": {"name": "s3", "key": "a"},
        "secretKeySecret": {"name": "s3", "key": "b"},
    }
    assert spec["ttlStrategy"] == {"secondsAfterCompletion": 86400}
    assert spec["podGC"] == {"strategy": "OnWorkflowCompletion", "deleteDelayDuration": "600s"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "either image or workflow_template"),
        ({"image": "a", "workflow_template": "b"}, "either image or workflow_template"),
        ({"workflow_template": "b", "command": ["x"]}, "a workflow_template defines its own"),
        ({"image": "a", "cpu_limit": "two"}, "apps[0].cpu_limit: 'two' is not a Kubernetes quantity"),
        ({"image": "a", "namespace": "Not_Valid"}, "apps[0].namespace"),
        ({"image": "a", "input_path": "relative"}, "apps[0].input_path: expected an absolute path"),
        ({"image": "a", "env": {"1BAD": "x"}}, "apps[0].env.1BAD"),
        ({"image": "a", "imagee": "typo"}, "apps[0].imagee: unknown key"),
    ],
)
def test_bad_options_are_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build(ArgoOptions, options, "apps[0]")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "argo:2746"}, "engines.argo.url"),
        ({"url": "https://a", "token": "x", "token_file": "/t"}, "either token or token_file"),
        ({"url": "https://a", "artifact_repository": {"s3_endpoint": "https://minio:9000"}}, "without a scheme"),
        ({"url": "https://a", "instance": "MWM"}, "engines.argo.instance"),
        ({"url": "https://a", "poll_interval": 0}, "engines.argo.poll_interval"),
    ],
)
def test_bad_settings_are_refused(table, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build(ArgoSettings, table, "engines.argo")


async def test_the_argo_engine_needs_s3_storage(tmp_path, make_service) -> None:
    config = base_config(
        tmp_path, apps=[{"id": "seg", "engine": "argo", "image": "r/a:1"}], engines={"argo": {"url": "http://a"}}
    )
    with pytest.raises(ConfigError, match='needs \\[storage\\] kind = "s3"'):
        await make_service(config)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, EngineStatus("running", message="Pending")),
        ({"phase": "Pending"}, EngineStatus("running", message="Pending")),
        ({"phase": "Running"}, EngineStatus("running", message="Running")),
        ({"phase": "Succeeded"}, EngineStatus("succeeded", exit_code=0)),
        (
            {
                "phase": "Failed",
                "message": "child 'w' failed",
                "nodes": {
                    "w": {
                        "id": "w",
                        "name": "w",
                        "type": "Pod",
                        "phase": "Failed",
                        "message": "Error (exit code 2)",
                        "outputs": {"exitCode": "2"},
                    },
                },
            },
            EngineStatus("failed", message="workflow w failed: child 'w' failed; w: Error (exit code 2)", exit_code=2),
        ),
        ({"phase": "Error"}, EngineStatus("failed", message="workflow w error: no reason given")),
        (
            {
                "phase": "Failed",
                "message": "Step exceeded its deadline",
                "nodes": {
                    "w": {
                        "id": "w",
                        "name": "w",
                        "type": "Pod",
                        "phase": "Failed",
                        "message": "Step exceeded its deadline",
                    }
                },
            },
            EngineStatus(
                "failed", message="workflow w failed: Step exceeded its deadline; w: Step exceeded its deadline"
            ),
        ),
    ],
)
def test_workflow_status(status, expected) -> None:
    assert workflow_status({"metadata": {"name": "w"}, "status": status}) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("ct-seg", "ct-seg"), ("a b/c", "a-b-c"), ("-x-", "x"), ("é", ""), ("x" * 80, "x" * 63), ("a." + "-" * 70, "a")],
)
def test_label_value(text, value) -> None:
    assert label_value(text) == value


def test_refs_and_retry_delays() -> None:
    assert parse_ref('{"namespace": "n", "name": "w"}') == ("n", "w")
    with pytest.raises(EngineError):
        parse_ref("12345")
    for attempt in range(1, 10):
        assert 0 < retry_delay(attempt, 0.5, 8.0) <= 8.0
    assert retry_delay(1, 0.5, 8.0, retry_after="5") == 5.0
    assert retry_delay(1, 0.5, 8.0, retry_after="500") == 8.0


def test_the_fakes_selectors_and_field_filters() -> None:
    selector = parse_selector("a=1,b!=true,c,!d,e in (x, y),f notin (z)")
    assert selector_matches(selector, {"a": "1", "c": "", "e": "x"})
    assert not selector_matches(selector, {"a": "1", "b": "true", "c": "", "e": "x"})
    assert not selector_matches(selector, {"a": "1", "c": "", "d": "", "e": "x"})
    assert not selector_matches(selector, {"a": "1", "c": "", "e": "q"})
    body = {"metadata": {"continue": "5"}, "items": [{"metadata": {"name": "w", "uid": "u"}, "status": {"phase": "P"}}]}
    assert filter_fields(body, "metadata,items.metadata.name") == {
        "metadata": {"continue": "5"},
        "items": [{"metadata": {"name": "w"}}],
    }
    assert filter_fields(body, "-items.status") == {
        "metadata": {"continue": "5"},
        "items": [{"metadata": {"name": "w", "uid": "u"}}],
    }


def test_the_strict_description_refuses_a_misspelt_field(api) -> None:
    settings = build(ArgoSettings, SETTINGS, "engines.argo")
    workflow = build_workflow(request(), settings, build(ArgoOptions, {"image": "a"}, "apps[0]"))
    workflow["spec"]["activeDeadlineSecond"] = 5
    errors = api.schema_errors(CREATE, {"namespace": "mwm-jobs", "workflow": workflow})
    assert errors and "activeDeadlineSecond" in errors[0]
