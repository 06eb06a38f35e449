"""The applications: what is registered, and how each did over the last 24 hours."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Label, Static

from .data import APPS, STATS, Store
from .fmt import DASH, fmt_seconds_setting, match_summary, sum_states
from .widgets import Cell, KeyedTable, Pane, number_cell, theme_colour

APP_COLUMNS = [
    ("id", "Application"),
    ("engine", "Engine"),
    ("grouping", "Group"),
    ("timeout", "Wait"),
    ("succeeded", "OK"),
    ("failed", "Failed"),
    ("cancelled", "Cancelled"),
    ("active", "Active"),
    ("instances", "Inst"),
]
ENGINE_KEYS = ("command", "image", "arguments")
SPEC_KEYS = {
    "id",
    "name",
    "version",
    "description",
    "engine",
    "enabled",
    "match",
    "grouping",
    "timeout",
    "max_age",
    "run_timeout",
    "max_parallel",
    "max_attempts",
    "reprocess",
    "sinks",
    "origin",
}


class AppsPane(Pane):
    """Registered applications with their rules, and their recent throughput and failures."""

    DEFAULT_CSS = """
    AppsPane #app-table { height: 1fr; min-height: 4; }
    AppsPane #app-detail-box { height: 1fr; border-top: solid $primary 40%; padding: 0 1; }
    Screen.-wide AppsPane #app-table { height: 1fr; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._apps: dict[str, dict[str, Any]] = {}
        self._activity: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Label("Applications (jobs and instances over the last 24 h)", classes="caption")
        yield KeyedTable(APP_COLUMNS, sort="id", id="app-table")
        with VerticalScroll(id="app-detail-box"):
            yield Static("", id="app-detail")

    def main_widget(self) -> Widget:
        return self.query_one("#app-table", KeyedTable)

    def show(self, store: Store, changed: set[str]) -> None:
        if not changed & {APPS, STATS}:
            return
        if store.apps is not None:
            self._apps = {str(a["id"]): a for a in store.apps}
        if store.stats is not None:
            self._activity = dict(store.stats.get("apps") or {})
        table = self.query_one("#app-table", KeyedTable)
        table.sync({key: self._row(app) for key, app in self._apps.items()})
        self._show_detail()

    def _row(self, app: dict[str, Any]) -> tuple[Cell, ...]:
        app_id = str(app["id"])
        activity = self._activity.get(app_id) or {}
        jobs = activity.get("jobs") or {}
        failed = sum_states(jobs, ["failed"])
        name = Text(app_id, no_wrap=True, overflow="ellipsis")
        if not app.get("enabled", True):
            name.append(" (off)", style="dim")
        return (
            Cell(name, app_id),
            Cell(str(app.get("engine") or DASH)),
            Cell(str(app.get("grouping") or DASH)),
            Cell(fmt_seconds_setting(app.get("timeout")), float(app.get("timeout") or 0), justify="right"),
            number_cell(sum_states(jobs, ["succeeded"])),
            Cell(
                Text(f"{failed:,}", style=theme_colour(self.app, "text-error") if failed else ""),
                failed,
                justify="right",
            ),
            number_cell(sum_states(jobs, ["cancelled"])),
            number_cell(sum_states(jobs, ["scheduled", "launching", "running", "collecting"])),
            number_cell(int(activity.get("instances") or 0)),
        )

    def _show_detail(self) -> None:
        key = self.query_one("#app-table", KeyedTable).cursor_key
        app = self._apps.get(key) if key else None
        self.query_one("#app-detail", Static).update(self._detail(app) if app else Text("No application.", "dim"))

    def _detail(self, app: dict[str, Any]) -> Table:
        activity = self._activity.get(str(app["id"])) or {}
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        title = " ".join(str(x) for x in (app.get("name"), app.get("version")) if x) or str(app["id"])
        state = "enabled" if app.get("enabled", True) else "disabled"
        grid.add_row("application", Text(f"{title} · {state} · from {app.get('origin') or 'config'}"))
        if app.get("description"):
            grid.add_row("", Text(str(app["description"])))
        grid.add_row("triggers", Text(match_summary(app.get("match"))))
        grid.add_row(
            "grouping",
            Text(
                f"by {app.get('grouping')} · closes {fmt_seconds_setting(app.get('timeout'))} after the last "
                f"instance, at most {fmt_seconds_setting(app.get('max_age'))} after the first"
            ),
        )
        attempts = app.get("max_attempts")
        grid.add_row(
            "runs",
            Text(
                f"{app.get('engine')} engine · {app.get('max_parallel')} at a time · stopped after "
                f"{fmt_seconds_setting(app.get('run_timeout'))}" + (f" · {attempts} attempts" if attempts else "")
            ),
        )
        for key in ENGINE_KEYS:
            if key in app:
                value = app[key]
                shown = " ".join(str(v) for v in value) if isinstance(value, list) else str(value)
                grid.add_row(key, Text(shown))
        for key, value in app.items():
            if key not in SPEC_KEYS and key not in ENGINE_KEYS and value not in (None, "", [], {}):
                grid.add_row(key.replace("_", " "), Text(str(value)))
        sinks = app.get("sinks") or []
        grid.add_row("sinks", Text(", ".join(sinks) if sinks else "none (results are kept, not sent)"))
        jobs = activity.get("jobs") or {}
        summary = ", ".join(f"{n} {s}" for s, n in sorted(jobs.items())) or "no jobs"
        grid.add_row("last 24 h", Text(f"{summary} · {int(activity.get('instances') or 0):,} instances"))
        error = activity.get("last_error")
        if error:
            grid.add_row("last error", Text(str(error).strip(), style=theme_colour(self.app, "text-error")))
        return grid

    def on_data_table_row_highlighted(self, event: KeyedTable.RowHighlighted) -> None:
        self._show_detail()
