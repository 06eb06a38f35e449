"""The registry of applications: those of the configuration file and those created over the API.

Both kinds are stored in the database (so jobs keep a record of what ran) and kept in memory as
validated ``AppSpec`` objects for discovery. Applications from the configuration file are
read-only over the API: the file is their source of truth.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import plugins
from .config import APP_KEYS, AppSpec, Settings, parse_app
from .db import Database
from .errors import ConfigError, Conflict, MwmError, NotFound, PluginError
from .options import build, to_plain

log = logging.getLogger(__name__)


def app_to_json(app: AppSpec) -> dict[str, Any]:
    """The table form of an application, as written in the configuration file."""
    plain = to_plain(app)
    engine_options = plain.pop("engine_options")
    plain.update(engine_options)
    return plain


class AppRegistry:
    """In-memory, validated view of the applications table."""

    def __init__(self, db: Database, settings: Settings, engine_options: Callable[[AppSpec, str], Any]) -> None:
        self._db = db
        self._settings = settings
        self._validate_engine = engine_options
        self._apps: dict[str, AppSpec] = {}
        self._origins: dict[str, str] = {}
        self._engine_options: dict[str, Any] = {}
        self._sink_ids = {s.id for s in settings.sinks}
        #: Applications created over the API that this configuration cannot run (a sink or an
        #: engine it names is gone): their stored table and why. They receive nothing until
        #: updated or deleted over the API; a server does not refuse to start because of them.
        self._unusable: dict[str, tuple[dict[str, Any], str]] = {}

    def validate(self, app: AppSpec, where: str) -> Any:
        """Check references and the engine's own options; returns the built engine options."""
        for i, sink in enumerate(app.sinks):
            if sink not in self._sink_ids:
                raise ConfigError(f"{where}.sinks[{i}]: no sink with id {sink!r} is configured")
        try:
            plugins.load(plugins.ENGINES, app.engine)
        except PluginError as exc:  # an unknown engine names the installed ones
            raise ConfigError(f"{where}.engine: {exc.message}", exc.detail) from None
        return self._validate_engine(app, where)

    async def load(self) -> None:
        """Store the configuration's applications, then load every application from the database."""
        config_specs: dict[str, Mapping[str, Any]] = {}
        for i, app in enumerate(self._settings.apps):
            self.validate(app, f"apps[{i}]")
            config_specs[app.id] = app_to_json(app)
        await self._db.sync_config_apps(config_specs, time.time())
        for row in await self._db.list_apps():
            where = f"application {row['id']!r}"
            try:
                app = parse_app(row["spec"], where)
                options = self.validate(app, where)
            except MwmError as exc:
                if row["origin"] == "config":
                    raise
                problem = exc.message + (f" ({exc.detail})" if exc.detail else "")
                log.warning(
                    "%s, created over the API, cannot run and receives nothing: %s; update it "
                    "(mwm apps update) or delete it (mwm apps delete)",
                    where,
                    problem,
                )
                self._unusable[row["id"]] = (dict(row["spec"]), problem)
                continue
            self._engine_options[app.id] = options
            self._apps[app.id] = app
            self._origins[app.id] = row["origin"]

    def all(self) -> list[AppSpec]:
        return list(self._apps.values())

    def get(self, app_id: str) -> AppSpec:
        try:
            return self._apps[app_id]
        except KeyError:
            raise NotFound(f"no application {app_id!r}") from None

    def engine_options(self, app_id: str) -> Any:
        return self._engine_options[app_id]

    def origin(self, app_id: str) -> str:
        return self._origins.get(app_id, "api")

    def __contains__(self, app_id: object) -> bool:
        return app_id in self._apps

    def describe(self, app: AppSpec) -> dict[str, Any]:
        return {**app_to_json(app), "origin": self.origin(app.id)}

    def listing(self) -> list[dict[str, Any]]:
        """Every application as the API shows it, those that cannot run included (with why)."""
        return [self.describe(app) for app in self._apps.values()] + [
            self._describe_unusable(app_id) for app_id in self._unusable
        ]

    def describe_id(self, app_id: str) -> dict[str, Any]:
        if app_id in self._unusable:
            return self._describe_unusable(app_id)
        return self.describe(self.get(app_id))

    def _describe_unusable(self, app_id: str) -> dict[str, Any]:
        spec, problem = self._unusable[app_id]
        return {**spec, "id": app_id, "enabled": False, "origin": "api", "problem": problem}

    def unusable(self, app_id: str, otherwise: str) -> str:
        """Why ``app_id``, which is not among the usable applications, cannot be used: what is
        wrong with it, or ``otherwise`` (formatted with its id) when there is no such application."""
        if app_id in self._unusable:
            return f"application {app_id!r} cannot run: {self._unusable[app_id][1]}"
        return otherwise.format(app_id)

    async def save(self, data: Mapping[str, Any], *, app_id: str | None = None, create: bool) -> AppSpec:
        """Create or replace an API application from its table form."""
        if app_id is not None:
            data = {**data, "id": data.get("id", app_id)}
            if data["id"] != app_id:
                raise ConfigError(f"id: cannot change an application's id ({app_id!r} to {data['id']!r})")
        app = parse_app(data, "application")
        exists = app.id in self._apps or app.id in self._unusable
        if create and exists:
            raise Conflict(f"application {app.id!r} already exists")
        if not create and not exists:
            raise NotFound(f"no application {app.id!r}")
        if exists and self.origin(app.id) == "config":
            raise Conflict(f"application {app.id!r} is defined in the configuration file; change it there")
        options = self.validate(app, "application")
        await self._db.put_app(app.id, "api", app_to_json(app), time.time())
        self._apps[app.id] = app
        self._origins[app.id] = "api"
        self._engine_options[app.id] = options
        self._unusable.pop(app.id, None)
        return app

    async def delete(self, app_id: str) -> None:
        if app_id not in self._unusable:
            self.get(app_id)
        if self.origin(app_id) == "config":
            raise Conflict(f"application {app_id!r} is defined in the configuration file; remove it there")
        await self._db.delete_app(app_id, time.time())
        self._apps.pop(app_id, None)
        self._engine_options.pop(app_id, None)
        self._origins.pop(app_id, None)
        self._unusable.pop(app_id, None)


def build_engine_options(app: AppSpec, where: str) -> Any:
    """Validate ``app.engine_options`` with its engine's ``Options`` dataclass. A key that is
    neither an application's nor the engine's is named with every key the table may have."""
    engine_cls = plugins.load(plugins.ENGINES, app.engine)
    engine_keys = {f.name for f in dataclasses.fields(engine_cls.Options)}
    unknown = sorted(set(app.engine_options) - engine_keys)
    if unknown:
        known = ", ".join(sorted(APP_KEYS | engine_keys))
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known keys: {known})")
    return build(engine_cls.Options, app.engine_options, where)
