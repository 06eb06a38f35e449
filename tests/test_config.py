"""Configuration: defaults that work, strict validation that names the key, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from mwm.config import load_settings, settings_from_mapping
from mwm.errors import ConfigError
from mwm.options import parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_work_without_a_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.server.http == "127.0.0.1:8080"
    assert settings.storage.kind == "local"
    assert settings.database_path == Path("mwm-data/mwm.db")
    assert settings.apps == () and settings.sinks == ()


def test_the_sample_configuration_is_valid() -> None:
    settings = load_settings(ROOT / "samples" / "config" / "mwm.toml", environ={})
    (app,) = settings.apps
    assert app.id == "ct-sample" and app.timeout == 5.0 and app.match.called_aet == ("MWM",)
    assert dict(app.engine_options) == {"command": ["python", "samples/apps/ct_sample/app.py"]}
    assert [s.kind for s in settings.sinks] == ["folder", "pull"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"server": {"htp": "x"}}, "server.htp: unknown key"),
        ({"sever": {}}, "sever: unknown key"),
        ({"server": {"http": "8080"}}, "server.http: expected HOST:PORT"),
        ({"server": {"max_upload_size": "lots"}}, "server.max_upload_size: expected a size"),
        ({"server": {"ae_title": "A" * 17}}, "server.ae_title: 'AAAAAAAAAAAAAAAAA' is not a valid AE title"),
        ({"jobs": {"max_parallel": 0}}, "jobs.max_parallel: must be greater than zero"),
        ({"jobs": {"max_parallel": "2"}}, "jobs.max_parallel: expected a whole number"),
        ({"database": {"synchronous": "off"}}, "database.synchronous: expected 'full' or 'normal'"),
        ({"apps": [{"id": "a", "timeout": "soon"}]}, "apps[0].timeout: expected a duration"),
        ({"apps": [{"id": "a b"}]}, "apps[0].id: 'a b' is not a valid id"),
        ({"apps": [{"command": ["x"]}]}, "apps[0].id: required key is missing"),
        ({"apps": [{"id": "a", "grouping": "visit"}]}, "apps[0].grouping: expected 'patient' or 'study' or 'series'"),
        ({"apps": [{"id": "a", "match": {"modalty": ["CT"]}}]}, "apps[0].match.modalty: unknown key"),
        (
            {"apps": [{"id": "a", "match": {"series_description": "("}}]},
            "apps[0].match.series_description: invalid regular expression",
        ),
        ({"apps": [{"id": "a", "sinks": ["x"]}]}, "apps[0].sinks[0]: no sink with id 'x' is configured"),
        ({"apps": [{"id": "a"}, {"id": "a"}]}, "apps[1].id: 'a' is declared twice"),
        ({"sinks": [{"id": "s"}]}, "sinks[0].kind: required key is missing"),
        ({"dicom": {"tls_cert": "c.pem"}}, "dicom.tls_key: TLS needs both"),
        ({"apps": {"id": "a"}}, "apps: expected a list of tables"),
    ],
)
def test_invalid_configuration_names_the_key(data, message) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data)
    assert caught.value.message.startswith(message), caught.value.message


def test_environment_overrides(tmp_path) -> None:
    path = tmp_path / "mwm.toml"
    path.write_text('[server]\nhttp = "127.0.0.1:8080"\n')
    settings = load_settings(
        path,
        environ={
            "MWM_SERVER_HTTP": "127.0.0.1:9999",
            "MWM_JOBS_MAX_PARALLEL": "7",
            "MWM_STORAGE_FSYNC": "false",
            "MWM_URL": "http://ignored",
            "MWM_TOKEN": "ignored",
        },
    )
    assert settings.server.http == "127.0.0.1:9999"
    assert settings.jobs.max_parallel == 7
    assert settings.storage.options["fsync"] is False
    with pytest.raises(ConfigError, match="MWM_SERVER_HTTP_PORT"):
        load_settings(path, environ={"MWM_SERVER_HTTP_PORT": "1"})
    with pytest.raises(ConfigError, match="MWM_SEVER_HTTP: unknown environment override"):
        load_settings(path, environ={"MWM_SEVER_HTTP": "1"})
    assert settings.environment == {
        "server.http": "MWM_SERVER_HTTP",
        "jobs.max_parallel": "MWM_JOBS_MAX_PARALLEL",
        "storage.fsync": "MWM_STORAGE_FSYNC",
    }


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path) -> None:
    path = tmp_path / "mwm.toml"
    path.write_text('[server]\nhttp = "nonsense"\n[jobs]\nmax_parallel = -1\n')
    with pytest.raises(ConfigError) as from_file:
        load_settings(path, environ={"MWM_JOBS_MAX_PARALLEL": "2"})
    assert from_file.value.message.startswith("server.http: ") and "MWM_" not in from_file.value.message
    with pytest.raises(ConfigError) as from_environment:
        load_settings(path, environ={"MWM_SERVER_HTTP": "127.0.0.1:8080", "MWM_JOBS_MAX_PARALLEL": "-3"})
    message = from_environment.value.message
    assert message == "jobs.max_parallel: must be greater than zero, got -3 (set by MWM_JOBS_MAX_PARALLEL)"


def test_file_errors_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("250ms", 0.25), ("2m", 120.0), ("1.5h", 5400.0), ("1d", 86400.0), (3, 3.0), ("7", 7.0)],
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize(("text", "size"), [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), (1024, 1024), ("1kb", 1000)])
def test_sizes(text, size) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("text", ["-1s", "soon", True, "5 parsecs"])
def test_bad_durations(text) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text, "x")
