"""The one typed configuration: a TOML file, ``MWM_*`` environment overrides, built-in defaults.

``load_settings`` is called once at start-up and returns a frozen ``Settings`` passed down to
every component; nothing reads the environment after that. Every error names the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from .errors import ConfigError
from .options import ByteSize, Duration, Regex, build, positive

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
CLIENT_ENVIRONMENT = {"MWM_URL", "MWM_TOKEN", "MWM_CONFIG", "MWM_CACERT", "MWM_FAULTS"}


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def _check_id(value: str, where: str) -> None:
    if not ID_PATTERN.match(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid id (letters, digits, '.', '_', '-'; at most 64; "
            "starting with a letter or digit)"
        )


def _check_aet(value: str, where: str) -> None:
    if not AE_TITLE.match(value) or value.strip() != value:
        raise ConfigError(f"{where}: {value!r} is not a valid AE title (1 to 16 printable characters)")


def _check_aets(values: tuple[str, ...], where: str) -> None:
    for i, value in enumerate(values):
        _check_aet(value, f"{where}[{i}]")


def _check_address(value: str, where: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT such as '127.0.0.1:8080', got {value!r}")


def _check_optional_address(value: str | None, where: str) -> None:
    if value is not None:
        _check_address(value, where)


def _check_ids(values: tuple[str, ...], where: str) -> None:
    for i, value in enumerate(values):
        _check_id(value, f"{where}[{i}]")


@dataclass(frozen=True)
class TokenSpec:
    """A bearer token and the role it grants (``read`` or ``admin``)."""

    token: str
    role: Literal["read", "admin"] = "admin"
    name: str = ""


@dataclass(frozen=True)
class DicomSource:
    """A known sender: its calling AE title and, optionally, the only address it may come from."""

    ae_title: str = field(metadata={"check": _check_aet})
    host: str | None = None


@dataclass(frozen=True)
class DicomAe:
    """Per-AE-title settings of the DICOM SCP: which SOP classes it accepts."""

    ae_title: str = field(metadata={"check": _check_aet})
    allow_sop_classes: tuple[str, ...] = ()  # empty: every storage SOP class
    deny_sop_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DicomSettings:
    """The DICOM SCP (enabled by ``server.dicom``)."""

    ae_titles: tuple[str, ...] = field(default=(), metadata={"check": _check_aets})
    aes: tuple[DicomAe, ...] = ()
    sources: tuple[DicomSource, ...] = ()
    reject_unknown_sources: bool | None = None  # default: true when sources are listed
    max_associations: int = field(default=16, metadata={"check": positive})
    max_pdu_size: int = 1 << 20  # bytes; 0: unlimited (a peer could then make mwm allocate huge PDUs)
    acse_timeout: Duration = Duration(30.0)
    dimse_timeout: Duration = Duration(60.0)
    network_timeout: Duration = Duration(60.0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, clients must present a certificate signed by it

    @property
    def rejects_unknown_sources(self) -> bool:
        if self.reject_unknown_sources is None:
            return bool(self.sources)
        return self.reject_unknown_sources


@dataclass(frozen=True)
class ServerSettings:
    http: str = field(default="127.0.0.1:8080", metadata={"check": _check_address})
    dicom: str | None = field(default=None, metadata={"check": _check_optional_address})
    data_dir: Path = Path("./mwm-data")
    ae_title: str = field(default="MWM", metadata={"check": _check_aet})
    max_upload_size: ByteSize = ByteSize(2 * 2**30)
    max_instance_size: ByteSize = ByteSize(2 * 2**30)
    shutdown_timeout: Duration = Duration(30.0)
    tokens: tuple[TokenSpec, ...] = ()
    tokens_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    tls_cert: Path | None = None  # HTTPS for the API when set (with tls_key)
    tls_key: Path | None = None
    #: Disk pressure: new uploads and associations are refused while the storage is fuller than
    #: this percentage, or has less free space than ``disk_reserve``; jobs and deliveries go on.
    disk_watermark: float = field(default=95.0, metadata={"check": lambda v, w: _check_percent(v, w)})
    disk_reserve: ByteSize = ByteSize(1 << 30)


def _check_percent(value: float, where: str) -> None:
    if not 0 < value <= 100:
        raise ConfigError(f"{where}: a percentage between 0 and 100 is expected, got {value!r}")


@dataclass(frozen=True)
class RetentionSettings:
    """What is deleted, and when. Data still needed (an open bucket, an unfinished job, a pending
    delivery) is never deleted."""

    instances_after: Duration | None = None  # keep instances this long after their job finished
    results_after: Duration | None = None  # keep results this long after they were produced
    only_delivered: bool = True  # delete results only once every delivery of them is delivered or skipped
    interval: Duration = field(default=Duration(3600.0), metadata={"check": positive})


@dataclass(frozen=True)
class DatabaseSettings:
    path: Path | None = None  # default: <data_dir>/mwm.db
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout: Duration = Duration(10.0)


@dataclass(frozen=True)
class JobSettings:
    max_parallel: int = field(default=4, metadata={"check": positive})
    max_attempts: int = field(default=3, metadata={"check": positive})
    retry_backoff: Duration = Duration(10.0)
    retry_backoff_max: Duration = Duration(600.0)
    keep_work: bool = False
    work_dir: Path | None = None  # default: <data_dir>/work
    #: Largest output a job may write; a job writing more is stopped and failed.
    max_output_size: ByteSize = ByteSize(20 * 2**30)


@dataclass(frozen=True)
class DeliverySettings:
    max_attempts: int = field(default=60, metadata={"check": positive})
    retry_backoff: Duration = Duration(5.0)
    retry_backoff_max: Duration = Duration(1800.0)
    batch_size: int = field(default=100, metadata={"check": positive})


@dataclass(frozen=True)
class MatchRules:
    """Which instances an application wants. Every rule given must match; an empty rule matches all."""

    called_aet: tuple[str, ...] = field(default=(), metadata={"check": _check_aets})
    calling_aet: tuple[str, ...] = field(default=(), metadata={"check": _check_aets})
    modality: tuple[str, ...] = ()
    sop_class_uid: tuple[str, ...] = ()
    series_description: Regex | None = None
    body_part: Regex | None = None


@dataclass(frozen=True)
class AppSpec:
    """A registered application: what triggers it, how its instances are grouped, where results go.

    ``engine_options`` holds the keys the engine plugin defines (``command`` for the local engine,
    ``image`` for Argo, ...); they are validated by that plugin.
    """

    id: str = field(metadata={"check": _check_id})
    name: str = ""
    version: str = ""
    description: str = ""
    engine: str = "local"
    enabled: bool = True
    match: MatchRules = MatchRules()
    grouping: Literal["patient", "study", "series"] = "study"
    timeout: Duration = Duration(30.0)
    max_age: Duration = field(default=Duration(3600.0), metadata={"check": positive})
    run_timeout: Duration = field(default=Duration(3600.0), metadata={"check": positive})
    max_parallel: int = field(default=1, metadata={"check": positive})
    max_attempts: int | None = field(default=None, metadata={"check": positive})
    reprocess: bool = False
    #: What a bucket that closes after an earlier job of its group (the same study, series or
    #: patient) hands to its job: only the instances that arrived since ("alone"), or every
    #: instance of the group received so far ("whole"), so the application sees the whole study.
    late_arrivals: Literal["alone", "whole"] = "alone"
    sinks: tuple[str, ...] = field(default=(), metadata={"check": _check_ids})
    engine_options: Mapping[str, Any] = field(default_factory=_empty)


APP_KEYS = {f.name for f in dataclasses.fields(AppSpec)} - {"engine_options"}


@dataclass(frozen=True)
class SinkSpec:
    """A destination for results; ``options`` are validated by the sink plugin."""

    id: str = field(metadata={"check": _check_id})
    kind: str
    options: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True)
class StorageSpec:
    kind: str = "local"
    options: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSpec = StorageSpec()
    jobs: JobSettings = JobSettings()
    delivery: DeliverySettings = DeliverySettings()
    dicom: DicomSettings = DicomSettings()
    retention: RetentionSettings = RetentionSettings()
    #: Per-engine settings tables (``[engines.argo]``), validated by each engine plugin.
    engines: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty)
    apps: tuple[AppSpec, ...] = ()
    sinks: tuple[SinkSpec, ...] = ()
    source: Path | None = None
    #: The keys set by ``MWM_*`` environment variables (``"storage.fsync"``: ``"MWM_STORAGE_FSYNC"``),
    #: so an error about one names the variable rather than a file the key is not in.
    environment: Mapping[str, str] = field(default_factory=_empty)

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    @property
    def database_path(self) -> Path:
        return self.database.path or self.data_dir / "mwm.db"

    @property
    def work_dir(self) -> Path:
        return self.jobs.work_dir or self.data_dir / "work"

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "staging"


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "database": DatabaseSettings,
    "jobs": JobSettings,
    "delivery": DeliverySettings,
    "dicom": DicomSettings,
    "retention": RetentionSettings,
}


def parse_app(data: Mapping[str, object], where: str) -> AppSpec:
    """Build an ``AppSpec`` from a table: the common keys, the rest left for the engine plugin."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    common = {k: v for k, v in data.items() if k in APP_KEYS}
    engine_options = {k: v for k, v in data.items() if k not in APP_KEYS}
    if "engine_options" in data:
        raise ConfigError(f"{where}.engine_options: unknown key (write the engine's keys in the app's table)")
    app = build(AppSpec, common, where)
    return dataclasses.replace(app, engine_options=MappingProxyType(dict(engine_options)))


def _parse_sink(data: object, where: str) -> SinkSpec:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    for key in ("id", "kind"):
        if key not in data:
            raise ConfigError(f"{where}.{key}: required key is missing")
        if not isinstance(data[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {data[key]!r}")
    _check_id(data["id"], f"{where}.id")
    options = {k: v for k, v in data.items() if k not in ("id", "kind")}
    return SinkSpec(id=data["id"], kind=data["kind"], options=MappingProxyType(options))


def _env_value(raw: str) -> object:
    """An environment value read as a TOML value when it is one (numbers, booleans, lists)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_environment(
    data: dict[str, Any], environ: Mapping[str, str], applied: dict[str, str] | None = None
) -> dict[str, Any]:
    """Apply ``MWM_<SECTION>_<KEY>`` overrides (e.g. ``MWM_SERVER_HTTP``) to the raw tables; each
    key set is recorded in ``applied`` (``"server.http"``: ``"MWM_SERVER_HTTP"``)."""
    sections = sorted([*list(_SECTIONS), "storage"], key=len, reverse=True)
    for name, raw in sorted(environ.items()):
        if not name.startswith("MWM_") or name in CLIENT_ENVIRONMENT:
            continue
        rest = name[4:].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(
                f"{name}: unknown environment override (expected MWM_<SECTION>_<KEY> with a section "
                f"among {', '.join(sorted(sections))})"
            )
        key = rest[len(section) + 1 :]
        if section in _SECTIONS and key not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            raise ConfigError(f"{name}: unknown environment override: [{section}] has no key {key!r}")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        table[key] = _env_value(raw)
        if applied is not None:
            applied[f"{section}.{key}"] = name
    return data


def naming_the_environment(exc: ConfigError, environment: Mapping[str, str]) -> ConfigError:
    """``exc`` with the environment variable named when the key it is about was set by one."""
    for key, name in environment.items():
        if exc.message.startswith((f"{key}:", f"{key}.", f"{key}[")):
            return ConfigError(f"{exc.message} (set by {name})", exc.detail)
    return exc


def settings_from_mapping(
    data: Mapping[str, Any], source: Path | None = None, environment: Mapping[str, str] | None = None
) -> Settings:
    """Validate raw configuration tables and build the frozen ``Settings``."""
    known = set(_SECTIONS) | {"storage", "apps", "sinks", "engines"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: expected a table, got {table!r}")
        sections[name] = build(cls, table, name)
    storage_table = data.get("storage", {})
    if not isinstance(storage_table, Mapping):
        raise ConfigError(f"storage: expected a table, got {storage_table!r}")
    kind = storage_table.get("kind", "local")
    if not isinstance(kind, str):
        raise ConfigError(f"storage.kind: expected a string, got {kind!r}")
    storage = StorageSpec(kind=kind, options=MappingProxyType({k: v for k, v in storage_table.items() if k != "kind"}))
    engines_raw = data.get("engines", {})
    if not isinstance(engines_raw, Mapping) or not all(isinstance(v, Mapping) for v in engines_raw.values()):
        raise ConfigError("engines: expected tables such as [engines.argo]")
    apps_raw = data.get("apps", [])
    sinks_raw = data.get("sinks", [])
    if not isinstance(apps_raw, list):
        raise ConfigError("apps: expected a list of tables ([[apps]])")
    if not isinstance(sinks_raw, list):
        raise ConfigError("sinks: expected a list of tables ([[sinks]])")
    apps = tuple(parse_app(a, f"apps[{i}]") for i, a in enumerate(apps_raw))
    sinks = tuple(_parse_sink(s, f"sinks[{i}]") for i, s in enumerate(sinks_raw))
    _check_unique([a.id for a in apps], "apps")
    _check_unique([s.id for s in sinks], "sinks")
    sink_ids = {s.id for s in sinks}
    for i, app in enumerate(apps):
        for j, sink in enumerate(app.sinks):
            if sink not in sink_ids:
                raise ConfigError(f"apps[{i}].sinks[{j}]: no sink with id {sink!r} is configured")
    server: ServerSettings = sections["server"]
    dicom: DicomSettings = sections["dicom"]
    if (server.tls_cert is None) != (server.tls_key is None):
        raise ConfigError("server.tls_key: HTTPS needs both tls_cert and tls_key")
    if (dicom.tls_cert is None) != (dicom.tls_key is None):
        raise ConfigError("dicom.tls_key: TLS needs both tls_cert and tls_key")
    if server.tokens_file is not None and not server.tokens_file.is_file():
        raise ConfigError(f"server.tokens_file: {server.tokens_file} is not a readable file")
    return Settings(
        server=server,
        database=sections["database"],
        storage=storage,
        jobs=sections["jobs"],
        delivery=sections["delivery"],
        dicom=sections["dicom"],
        retention=sections["retention"],
        engines=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in engines_raw.items()}),
        apps=apps,
        sinks=sinks,
        source=source,
        environment=MappingProxyType(dict(environment or {})),
    )


def _check_unique(ids: list[str], where: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(ids):
        if value in seen:
            raise ConfigError(f"{where}[{i}].id: {value!r} is declared twice")
        seen.add(value)


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply ``MWM_*`` overrides and validate everything."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
    applied: dict[str, str] = {}
    data = apply_environment(data, environ, applied)
    try:
        return settings_from_mapping(data, source=path, environment=applied)
    except ConfigError as exc:
        raise naming_the_environment(exc, applied) from None


def read_tokens(settings: ServerSettings) -> tuple[TokenSpec, ...]:
    """The configured tokens plus those in ``tokens_file`` (lines ``ROLE TOKEN`` or ``TOKEN``)."""
    tokens = list(settings.tokens)
    if settings.tokens_file is not None:
        for n, line in enumerate(settings.tokens_file.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) == 1:
                tokens.append(TokenSpec(token=parts[0]))
            elif len(parts) == 2 and parts[0] in ("read", "admin"):
                tokens.append(TokenSpec(token=parts[1], role=parts[0]))  # type: ignore[arg-type]
            else:
                raise ConfigError(f"server.tokens_file: line {n}: expected 'TOKEN' or 'read|admin TOKEN'")
    for i, spec in enumerate(tokens):
        if len(spec.token) < 16:
            raise ConfigError(f"server.tokens[{i}].token: a token must have at least 16 characters")
    return tuple(tokens)
