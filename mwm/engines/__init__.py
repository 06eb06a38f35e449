"""The ``Engine`` contract: how a job's application is run (local process, Argo Workflows, ...).

Engines are plugins resolved by name through the ``mwm.engines`` entry points. The job service
drives them; an engine never touches the database.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..config import AppSpec, Settings
from ..storage import Storage

EngineState = Literal["pending", "running", "succeeded", "failed", "lost"]


@dataclass(frozen=True)
class InputInstance:
    storage_key: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class JobContext:
    """Everything an engine needs to run one attempt of one job."""

    job_id: int
    attempt: int
    app: AppSpec
    options: Any  # the engine's Options built from app.engine_options
    inputs: tuple[InputInstance, ...]
    work_dir: Path  # local folder owned by this job: input/, output/, job.log
    correlation_id: str
    run_timeout: float

    @property
    def input_dir(self) -> Path:
        return self.work_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "job.log"


@dataclass(frozen=True)
class EngineStatus:
    """What an engine knows of a launched job.

    ``lost`` means the engine has no trace of it any more (e.g. its process died with a previous
    mwm): the job service runs it again.
    """

    state: EngineState
    message: str = ""
    exit_code: int | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "lost")


class Engine(ABC):
    """Runs applications.

    Contract:
    - ``launch`` starts the job and returns a reference (a string the job service stores) that
      identifies it in every later call, including after mwm restarts.
    - ``wait`` returns the job's status once it has finished, or its current status after at most
      ``timeout`` seconds. The default polls ``poll`` every ``poll_interval`` seconds.
    - ``cancel`` stops the job (and everything it started); it is idempotent.
    - ``collect`` returns a local folder holding the job's outputs once it has succeeded.
    - The job's log is written to ``ctx.log_path`` (an engine may fill it at the end).
    All methods may raise ``EngineError``; ``retryable=False`` marks errors that trying again
    cannot fix (a bad configuration, a refused credential).
    """

    name: ClassVar[str]
    #: A frozen dataclass of the per-application options this engine takes.
    Options: ClassVar[type[Any]]
    #: Seconds between polls in the default ``wait``.
    poll_interval: ClassVar[float] = 2.0
    #: A frozen dataclass of the engine-wide settings (the ``[engines.<name>]`` table), if any.
    EngineSettings: ClassVar[type[Any] | None] = None

    def __init__(self, *, settings: Settings, storage: Storage) -> None:
        from ..errors import ConfigError
        from ..options import build

        self.settings = settings
        self.storage = storage
        table = settings.engines.get(self.name, {})
        if self.EngineSettings is not None:
            self.engine_settings: Any = build(self.EngineSettings, table, f"engines.{self.name}")
        elif table:
            raise ConfigError(f"engines.{self.name}: the {self.name} engine takes no settings")

    async def open(self) -> None:
        """Acquire shared resources (HTTP sessions, ...)."""

    async def close(self) -> None:
        """Release them; jobs still running are left to be found again by ``poll`` after a restart."""

    @abstractmethod
    async def launch(self, ctx: JobContext) -> str: ...

    @abstractmethod
    async def poll(self, ctx: JobContext, ref: str) -> EngineStatus: ...

    async def wait(self, ctx: JobContext, ref: str, timeout: float) -> EngineStatus:
        status = await self.poll(ctx, ref)
        if status.finished:
            return status
        await asyncio.sleep(min(timeout, self.poll_interval))
        return await self.poll(ctx, ref)

    @abstractmethod
    async def cancel(self, ctx: JobContext, ref: str) -> None: ...

    @abstractmethod
    async def collect(self, ctx: JobContext, ref: str) -> Path: ...

    def problem(self, options: Any) -> str | None:
        """Why an application with these options cannot run as things are now (a program not
        installed, say), or None; said at start-up, without refusing it (it may be fixed later)."""
        return None

    async def abandon(self, ctx: JobContext) -> None:
        """Stop what an interrupted ``launch`` may have started before its reference was recorded."""

    async def cleanup(self, ctx: JobContext, ref: str) -> None:
        """Remove what the engine keeps for a finished job (default: nothing)."""


class EngineRegistry:
    """Engines by name, created on first use through the ``mwm.engines`` entry points."""

    def __init__(self, *, settings: Settings, storage: Storage) -> None:
        self._settings = settings
        self._storage = storage
        self._engines: dict[str, Engine] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> Engine:
        from .. import plugins  # the registry module imports no plugin itself

        async with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                cls = plugins.load(plugins.ENGINES, name)
                engine = cls(settings=self._settings, storage=self._storage)
                await engine.open()
                self._engines[name] = engine
            return engine

    async def close(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.close()
