"""The jobs: a sortable, filterable table updated in place, and the selected job's details and log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Input, Log, Select, Static, TabbedContent, TabPane

from .data import APPS, JOB, JOBS, LOG, Store
from .fmt import (
    ACTIVE_JOB_STATES,
    CANCELLABLE_STATES,
    DASH,
    JOB_STATES,
    RETRYABLE_STATES,
    clip,
    fmt_age,
    fmt_bytes,
    fmt_duration,
    job_run_seconds,
    parse_ts,
    uid_tail,
)
from .widgets import Cell, DeliveryTable, KeyedTable, Pane, delivery_row, number_cell, state_text, theme_colour

JOB_COLUMNS = [
    ("id", "ID"),
    ("state", "State"),
    ("app", "App"),
    ("patient", "Patient"),
    ("study", "Study"),
    ("instances", "Inst"),
    ("results", "Res"),
    ("age", "Age"),
    ("ran", "Ran"),
]
STATE_ORDER = {state: i for i, state in enumerate(JOB_STATES)}
#: Computed by mwm when it answers: they change on every answer, the job does not.
SERVER_TIMES = frozenset({"age_seconds", "run_seconds"})
ALL = "*"
ACTIVE = "active"
RESULT_COLUMNS = [
    ("file", "File"),
    ("size", "Size"),
    ("sink", "Sink"),
    ("state", "State"),
    ("tries", "Tries"),
    ("error", "Last error"),
]


def job_matches(job: Mapping[str, Any], state: str, app: str, text: str) -> bool:
    """Whether a job passes the filters (``*`` is "any"; ``text`` is searched in patient and study)."""
    job_state = job.get("state")
    if state == ACTIVE and job_state not in ACTIVE_JOB_STATES:
        return False
    if state not in (ALL, ACTIVE) and job_state != state:
        return False
    if app != ALL and job.get("app_id") != app:
        return False
    if text:
        needle = text.lower()
        haystack = " ".join(str(job.get(k) or "") for k in ("patient_id", "study_instance_uid", "correlation_id"))
        if needle not in haystack.lower():
            return False
    return True


class ResultTable(DeliveryTable):
    """A job's results, one row per (result, sink) delivery; results with no sink get one row."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(RESULT_COLUMNS, **kwargs)


class JobDetail(Vertical):
    """The selected job: summary (states, times, error, series), results and deliveries, log."""

    DEFAULT_CSS = """
    JobDetail { height: 1fr; border-top: solid $primary 40%; }
    JobDetail TabbedContent, JobDetail ContentSwitcher, JobDetail TabPane { height: 1fr; }
    JobDetail TabPane { padding: 0 1; }
    JobDetail #summary { height: auto; }
    JobDetail Log { height: 1fr; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._job: dict[str, Any] | None = None
        self._listed: dict[str, Any] | None = None
        self._loading = False
        self._log_text: str | None = None

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="summary-tab"):
            with TabPane("Summary", id="summary-tab"), VerticalScroll():
                yield Static("No job selected.", id="summary")
            with TabPane("Results", id="results-tab"):
                yield ResultTable(id="results", sort="file")
            with TabPane("Log", id="log-tab"):
                yield Log(id="log", highlight=False, auto_scroll=True)

    def show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = f"{tab}-tab"

    @property
    def active_tab(self) -> str:
        return self.query_one(TabbedContent).active.removesuffix("-tab")

    def show_job(self, job: dict[str, Any] | None, listed: dict[str, Any] | None, now: float) -> None:
        """Show the full details when there are some, else what the jobs list says (loading)."""
        self._job, self._listed = job or None, listed
        self._loading = job is None and listed is not None
        self.render_summary(now)
        self._show_results()

    def render_summary(self, now: float) -> None:
        self.query_one("#summary", Static).update(self._summary(now))

    def _summary(self, now: float) -> RenderableType:
        job = self._job or self._listed
        if job is None:
            return Text("No job selected.", style="dim")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        state = str(job.get("state") or "")
        head = Text.assemble(f"{job['id']} · {job.get('app_id')} · ", state_text(state, self.app))
        head.append(f" · attempt {job.get('attempt', '?')} of {job.get('max_attempts', '?')}")
        grid.add_row("job", head)
        grid.add_row("patient", Text(str(job.get("patient_id") or DASH)))
        grid.add_row("study", Text(str(job.get("study_instance_uid") or DASH)))
        times = []
        for label, key in (("created", "created_at"), ("started", "started_at")):
            ts = parse_ts(job.get(key))
            if ts is not None:
                times.append(f"{label} {fmt_age(ts, now)} ago")
        run = job_run_seconds(job, now)
        if run is not None:
            times.append(("running for " if state in ACTIVE_JOB_STATES else "ran ") + fmt_duration(run))
        finished = parse_ts(job.get("finished_at"))
        if finished is not None and run is None:
            times.append(f"ended {fmt_age(finished, now)} ago")
        grid.add_row("times", Text(" · ".join(times) or DASH))
        not_before = parse_ts(job.get("not_before"))
        if state == "scheduled" and not_before is not None and not_before > now:
            grid.add_row("next try", Text(f"in {fmt_duration(not_before - now)}"))
        if job.get("error"):
            grid.add_row("error", Text(str(job["error"]).strip(), style=theme_colour(self.app, "text-error")))
        series = (self._job or {}).get("series")
        count = job.get("instance_count")
        if series is not None:
            grid.add_row("instances", Text(f"{count} in {len(series)} series"))
            for entry in series:
                line = Text(no_wrap=True, overflow="ellipsis")
                line.append(f"{entry.get('modality') or '?':<3} ")
                line.append(f"{clip(entry.get('series_description'), 28):<28} ")
                line.append(f"{entry.get('instance_count', 0):>5}  ")
                line.append(uid_tail(entry.get("series_instance_uid")), style="dim")
                grid.add_row("", line)
        else:
            grid.add_row("instances", Text(str(count if count is not None else DASH)))
        results = (self._job or {}).get("results")
        if results is not None:
            deliveries = (self._job or {}).get("deliveries") or []
            states: dict[str, int] = {}
            for delivery in deliveries:
                states[delivery["state"]] = states.get(delivery["state"], 0) + 1
            text = f"{len(results)} ({fmt_bytes(sum(int(r.get('size') or 0) for r in results))})"
            if states:
                text += " · deliveries " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
            grid.add_row("results", Text(text))
        grid.add_row("correlation", Text(str(job.get("correlation_id") or DASH), style="dim"))
        if self._loading:
            return Group(grid, Text("loading details…", style="dim italic"))
        return grid

    def _show_results(self) -> None:
        table = self.query_one("#results", ResultTable)
        job = self._job or {}
        results = {int(r["id"]): r for r in job.get("results") or []}
        rows: dict[str, tuple[Cell, ...]] = {}
        deliveries: dict[str, dict[str, Any]] = {}
        delivered_results: set[int] = set()
        for delivery in job.get("deliveries") or []:
            result = results.get(int(delivery["result_id"]), {})
            key = f"d{delivery['id']}"
            deliveries[key] = delivery
            delivered_results.add(int(delivery["result_id"]))
            _, _, file, sink, state, tries, error = delivery_row(delivery, self.app, result.get("path"))
            rows[key] = (file, self._size_cell(result), sink, state, tries, error)
        for result_id, result in results.items():
            if result_id not in delivered_results:
                path = str(result.get("path") or DASH)
                rows[f"r{result_id}"] = (
                    Cell(path, (path, 0)),
                    self._size_cell(result),
                    Cell(DASH, ("", 0)),
                    Cell(Text("no sink", style="dim"), ("", 0)),
                    number_cell(None),
                    Cell(DASH, ("", 0)),
                )
        table.show_rows(rows, deliveries)

    @staticmethod
    def _size_cell(result: dict[str, Any]) -> Cell:
        size = result.get("size")
        return Cell(fmt_bytes(size) if size is not None else DASH, int(size or 0), justify="right")

    def show_log(self, text: str | None) -> None:
        widget = self.query_one("#log", Log)
        if text is None:
            if self._log_text is not None:
                widget.clear()
            self._log_text = None
            return
        if text == self._log_text:
            return
        if self._log_text and text.startswith(self._log_text):
            widget.write(text[len(self._log_text) :])
        else:
            widget.clear()
            widget.write(text)
        self._log_text = text


class JobsPane(Pane):
    """Every recent job, filtered and sorted, with the highlighted job's details below (or beside)."""

    DEFAULT_CSS = """
    JobsPane #filters { height: 1; }
    JobsPane #filters Select { width: 20; }
    JobsPane #filters Input { width: 1fr; }
    JobsPane #jobs-body { height: 1fr; }
    JobsPane #job-table { height: 2fr; min-height: 4; }
    JobsPane JobDetail { height: 3fr; }
    """
    #: Added to the app's CSS: unscoped, since it depends on the screen's width class.
    WIDE_CSS = """
    Screen.-wide JobsPane #jobs-body { layout: horizontal; }
    Screen.-wide JobsPane #job-table { width: 1fr; height: 1fr; }
    Screen.-wide JobsPane JobDetail { width: 1fr; height: 1fr; border-top: none; border-left: solid $primary 40%; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "cancel_job", "Cancel"),
        Binding("r", "retry_job", "Retry"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("S", "sort_reverse", "Reverse sort", show=False),
        Binding("l", "detail('log')", "Log"),
        Binding("i", "detail('summary')", "Summary", show=False),
        Binding("o", "detail('results')", "Results", show=False),
        Binding("escape", "leave_filter", "Back to the table", show=False),
    ]
    WRITE_ACTIONS = frozenset({"cancel_job", "retry_job"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._jobs: dict[str, dict[str, Any]] = {}
        self._state = ALL
        self._app = ALL
        self._text = ""
        self._selected: str | None = None
        self._app_ids: list[str] = []

    def compose(self) -> ComposeResult:
        states = [("all states", ALL), ("active", ACTIVE), *[(s, s) for s in JOB_STATES]]
        with Horizontal(id="filters"):
            yield Select(states, value=ALL, allow_blank=False, compact=True, id="state-filter")
            yield Select([("all apps", ALL)], value=ALL, allow_blank=False, compact=True, id="app-filter")
            yield Input(placeholder="/ patient or study…", compact=True, id="text-filter")
        with Vertical(id="jobs-body"):
            yield KeyedTable(JOB_COLUMNS, sort="id", reverse=True, follow_top=True, id="job-table")
            yield JobDetail(id="detail")

    def main_widget(self) -> Widget:
        return self.query_one("#job-table", KeyedTable)

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#job-table", KeyedTable)

    @property
    def detail(self) -> JobDetail:
        return self.query_one(JobDetail)

    # -- data ---------------------------------------------------------------------------------

    def show(self, store: Store, changed: set[str]) -> None:
        if APPS in changed and store.apps is not None:
            self._show_app_ids([str(a["id"]) for a in store.apps])
        if JOBS in changed and store.jobs is not None:
            self._jobs = {str(j["id"]): j for j in store.jobs}
            self._apply_filter()
        if JOB in changed or (JOBS in changed and self._selected is not None):
            listed = self._jobs.get(self._selected) if self._selected else None
            if store.job == {}:  # the job is gone
                self.detail.show_job(None, None, self.console.now())
            elif store.job is not None and str(store.job.get("id")) == self._selected:
                self.detail.show_job(store.job, listed, self.console.now())
            else:
                self.detail.show_job(None, listed, self.console.now())
            self.refresh_bindings()
        if LOG in changed:
            self.detail.show_log(store.log)

    def _show_app_ids(self, app_ids: list[str]) -> None:
        known = sorted(set(app_ids) | {str(j.get("app_id")) for j in self._jobs.values()})
        if known == self._app_ids:
            return
        self._app_ids = known
        select: Select[str] = self.query_one("#app-filter", Select)
        current = self._app
        with select.prevent(Select.Changed):
            select.set_options([("all apps", ALL), *[(a, a) for a in known]])
            select.value = current if current in known else ALL
        self._app = select.value if isinstance(select.value, str) else ALL

    def _apply_filter(self) -> None:
        now = self.console.now()
        shown = {k: j for k, j in self._jobs.items() if job_matches(j, self._state, self._app, self._text)}
        self.table.sync(self.table.rows_for(shown, lambda job: self.job_row(job, now), ignore=SERVER_TIMES))
        self._follow_cursor()

    def job_row(self, job: Mapping[str, Any], now: float) -> tuple[Cell, ...]:
        job_id = int(job["id"])
        state = str(job.get("state") or "")
        created = parse_ts(job.get("created_at"))
        run = job_run_seconds(job, now)
        patient = str(job.get("patient_id") or "")
        study = str(job.get("study_instance_uid") or "")
        return (
            number_cell(job_id),
            Cell(state_text(state, self.app), (STATE_ORDER.get(state, 99), job_id)),
            Cell(str(job.get("app_id") or DASH), (str(job.get("app_id") or ""), job_id)),
            Cell(clip(patient, 16), (patient, job_id)),
            Cell(uid_tail(study, 9), (study, job_id)),
            number_cell(int(job.get("instance_count") or 0)),
            number_cell(int(job.get("result_count") or 0)),
            Cell(fmt_age(created, now), (-(created or 0.0), job_id), justify="right"),
            Cell(fmt_duration(run), (run if run is not None else -1.0, job_id), justify="right"),
        )

    def tick(self) -> None:
        if not self._jobs:
            return
        now = self.console.now()

        def cells(key: str) -> dict[str, Cell]:
            row = self.job_row(self._jobs[key], now)
            return {"age": row[7], "ran": row[8]}

        self.table.update_columns(("age", "ran"), cells)
        selected = self._jobs.get(self._selected) if self._selected else None
        if selected is not None:
            self.detail.render_summary(now)

    # -- selection ----------------------------------------------------------------------------

    def _follow_cursor(self) -> None:
        key = self.table.cursor_key
        if key != self._selected:
            self._selected = key
            self.console.watch_job(int(key) if key is not None else None)
            self.detail.show_job(None, self._jobs.get(key) if key else None, self.console.now())
            self.detail.show_log(None)
            self.refresh_bindings()

    def on_data_table_row_highlighted(self, event: KeyedTable.RowHighlighted) -> None:
        if event.data_table is self.table:
            self._follow_cursor()

    def selected_job(self) -> dict[str, Any] | None:
        return self._jobs.get(self._selected) if self._selected else None

    def select_job(self, job_id: int) -> None:
        self.table.move_to(str(job_id))
        self._follow_cursor()

    # -- filters ------------------------------------------------------------------------------

    def on_select_changed(self, event: Select.Changed) -> None:
        value = event.value if isinstance(event.value, str) else ALL
        if event.select.id == "state-filter":
            self._state = value
        elif event.select.id == "app-filter":
            self._app = value
        self._apply_filter()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "text-filter":
            self._text = event.value.strip()
            self._apply_filter()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.table.focus()

    def set_filters(self, *, state: str | None = None, app: str | None = None, text: str | None = None) -> None:
        """Set filters from code (the widgets follow)."""
        if state is not None:
            self.query_one("#state-filter", Select).value = state
            self._state = state
        if app is not None:
            self.query_one("#app-filter", Select).value = app
            self._app = app
        if text is not None:
            self.query_one("#text-filter", Input).value = text
            self._text = text
        self._apply_filter()

    # -- actions ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if not allowed or not self.is_mounted:
            return allowed
        job = self.selected_job()
        if action == "cancel_job":
            return True if job is not None and job.get("state") in CANCELLABLE_STATES else None
        if action == "retry_job":
            return True if job is not None and job.get("state") in RETRYABLE_STATES else None
        return True

    def action_cancel_job(self) -> None:
        job = self.selected_job()
        if job is None or job.get("state") not in CANCELLABLE_STATES:
            self.app.bell()
            return
        self.console.ask_then_post(
            f"Cancel job {job['id']} ({job.get('app_id')}, patient {job.get('patient_id') or DASH}), "
            f"now {job.get('state')}?",
            f"/v1/jobs/{job['id']}/cancel",
            f"job {job['id']} cancelled",
            confirm="Cancel job",
        )

    def action_retry_job(self) -> None:
        job = self.selected_job()
        if job is None or job.get("state") not in RETRYABLE_STATES:
            self.app.bell()
            return
        self.console.ask_then_post(
            f"Run job {job['id']} ({job.get('app_id')}, patient {job.get('patient_id') or DASH}) again? "
            f"It is {job.get('state')}.",
            f"/v1/jobs/{job['id']}/retry",
            f"job {job['id']} scheduled again",
            confirm="Retry",
        )

    def action_filter(self) -> None:
        self.query_one("#text-filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.table.focus()

    def action_sort(self) -> None:
        self.table.cycle_sort()

    def action_sort_reverse(self) -> None:
        self.table.sort_by(self.table.sort_column, not self.table.sort_reverse)

    def action_detail(self, tab: str) -> None:
        self.detail.show_tab(tab)
