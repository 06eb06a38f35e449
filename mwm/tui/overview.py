"""The overview: ingest rate, today's totals, jobs by state, deliveries, storage, open buckets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Label, Sparkline, Static

from .data import BUCKETS, STATS, Store
from .fmt import (
    DASH,
    delivery_totals,
    fmt_age,
    fmt_bytes,
    fmt_count,
    fmt_countdown,
    parse_ts,
    sum_states,
    uid_tail,
)
from .widgets import Cell, KeyedTable, Pane, number_cell, theme_colour

BUCKET_COLUMNS = [
    ("id", "Bucket"),
    ("app", "App"),
    ("patient", "Patient"),
    ("study", "Study"),
    ("instances", "Inst"),
    ("open", "Open for"),
    ("due", "Closes in"),
]


#: Computed by mwm when it answers: they change on every answer, the bucket does not.
SERVER_TIMES = frozenset({"remaining_seconds"})


class Card(Vertical):
    """A titled box of a few lines."""

    DEFAULT_CSS = """
    Card {
        border: round $primary 50%; border-title-color: $text-primary; border-title-style: bold;
        padding: 0 1; height: 8; width: 1fr;
    }
    Card#jobs-card { width: 20; }
    Card Static { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    Card Sparkline { height: 2; }
    """

    def __init__(self, title: str, *children: Widget, **kwargs: Any) -> None:
        super().__init__(*children, **kwargs)
        self.border_title = title


def _line(label: str, value: str, width: int = 11, style: str = "") -> Text:
    text = Text(no_wrap=True, overflow="ellipsis", end="")
    text.append(label.ljust(width), style="dim")
    text.append(value, style=style)
    return text


def _plural(count: int | None, one: str, many: str) -> str:
    return f"{fmt_count(count)} {one if count == 1 else many}"


def _lines(lines: list[Text]) -> Text:
    text = Text("\n").join(lines)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


class OverviewPane(Pane):
    """What mwm is doing right now, at a glance."""

    DEFAULT_CSS = """
    OverviewPane #cards { height: 8; }
    OverviewPane #bucket-table { height: 1fr; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("c", "close_bucket", "Close bucket")]
    WRITE_ACTIONS = frozenset({"close_bucket"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._buckets: dict[str, dict[str, Any]] = {}
        self._had_buckets = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="cards"):
            yield Card("Ingest, 15 min", Sparkline([], id="rate"), Static(id="ingest-text"), id="ingest-card")
            yield Card("Jobs", Static(id="jobs-text"), id="jobs-card")
            yield Card("System", Static(id="system-text"), id="system-card")
        yield Label("Open buckets", id="buckets-caption", classes="caption")
        yield KeyedTable(BUCKET_COLUMNS, sort="due", id="bucket-table")

    def main_widget(self) -> Widget:
        return self.query_one("#bucket-table", KeyedTable)

    # -- data ---------------------------------------------------------------------------------

    def show(self, store: Store, changed: set[str]) -> None:
        if STATS in changed and store.stats is not None:
            self._show_stats(store.stats)
        if BUCKETS in changed and store.buckets is not None:
            self._show_buckets(store.buckets)
        if STATS in changed or BUCKETS in changed:
            self._caption(store.stats)

    def _show_stats(self, stats: dict[str, Any]) -> None:
        rate = [float(v) for v in stats.get("ingest_per_minute") or []]
        self.query_one("#rate", Sparkline).data = rate or [0.0]
        last = int(rate[-1]) if rate else 0
        lines = [
            Text(f"{last:,}/min · {int(sum(rate)):,} in 15 min"),
            _line("today", _plural(stats.get("instances"), "instance", "instances"), 6),
            _line("", _plural(stats.get("studies"), "study", "studies"), 6),
            _line("", fmt_bytes(stats.get("bytes")), 6),
        ]
        self.query_one("#ingest-text", Static).update(_lines(lines))

        jobs = stats.get("jobs") or {}
        error = theme_colour(self.app, "text-error")
        accent = theme_colour(self.app, "text-accent")
        rows = [
            ("scheduled", sum_states(jobs, ["scheduled"]), ""),
            ("running", sum_states(jobs, ["launching", "running", "collecting"]), accent),
            ("succeeded", sum_states(jobs, ["succeeded"]), ""),
            ("failed", sum_states(jobs, ["failed"]), error),
            ("cancelled", sum_states(jobs, ["cancelled"]), ""),
        ]
        self.query_one("#jobs-text", Static).update(
            _lines([_line(name, f"{count:>6,}", 10, style if count else "") for name, count, style in rows])
        )
        self.query_one("#system-text", Static).update(self._system_text(stats))

    def _system_text(self, stats: dict[str, Any]) -> Text:
        error = theme_colour(self.app, "text-error")
        warning = theme_colour(self.app, "text-warning")
        storage = stats.get("storage") or {}
        free, total = storage.get("free_bytes"), storage.get("total_bytes")
        disk = stats.get("disk") or {}
        pressure = disk.get("pressure")
        lines: list[Text] = []
        if free is not None and total:
            lines.append(_line("storage", f"{100.0 * (1 - free / total):.0f}% used", 9, error if pressure else ""))
            lines.append(Text(f"{fmt_bytes(free)} free of {fmt_bytes(total)}"))
        else:
            lines += [_line("storage", DASH, 9), Text("")]
        limit = disk.get("watermark_percent")
        if pressure:
            lines.append(Text(f"⚠ {pressure}", style=error))
        elif stats.get("accepting") is False:
            lines.append(Text("⚠ not accepting instances", style=error))
        elif limit:
            lines.append(_line("", f"limit {limit:g}%", 9, "dim"))
        else:
            lines.append(Text(""))
        totals = delivery_totals(stats.get("deliveries"))
        pending, failed = totals.get("pending", 0), totals.get("failed", 0)
        lines.append(_line("delivery", f"{pending:,} pending", 9, warning if pending else ""))
        lines.append(_line("", f"{failed:,} failed", 9, error if failed else ""))
        associations = stats.get("dicom_associations")
        lines.append(
            _line("DICOM", "off", 9, "dim")
            if associations is None
            else _line("DICOM", f"{associations} association{'s' if associations != 1 else ''} open", 9)
        )
        return _lines(lines)

    def _show_buckets(self, buckets: list[dict[str, Any]]) -> None:
        self._buckets = {str(b["id"]): b for b in buckets}
        now = self.console.now()
        table = self.query_one("#bucket-table", KeyedTable)
        table.sync(table.rows_for(self._buckets, lambda b: self._row(b, now), ignore=SERVER_TIMES))
        if bool(self._buckets) != self._had_buckets:  # the footer is redrawn only when "close" comes or goes
            self._had_buckets = bool(self._buckets)
            self.refresh_bindings()

    def _caption(self, stats: dict[str, Any] | None) -> None:
        shown = len(self._buckets)
        total = stats.get("open_buckets") if stats else None
        text = f"Open buckets ({shown:,})"
        if isinstance(total, int) and total > shown:
            text = f"Open buckets ({shown:,} of {total:,} shown)"
        self.query_one("#buckets-caption", Label).update(text)

    def _row(self, bucket: Mapping[str, Any], now: float) -> tuple[Cell, ...]:
        bucket_id = int(bucket["id"])
        return (
            number_cell(bucket_id),
            Cell(str(bucket.get("app_id") or DASH), (str(bucket.get("app_id")), bucket_id)),
            Cell(str(bucket.get("patient_id") or DASH), (str(bucket.get("patient_id") or ""), bucket_id)),
            Cell(uid_tail(bucket.get("study_instance_uid")), (bucket.get("study_instance_uid") or "", bucket_id)),
            number_cell(int(bucket.get("instance_count") or 0)),
            *self._clock_cells(bucket, now),
        )

    def _clock_cells(self, bucket: Mapping[str, Any], now: float) -> tuple[Cell, Cell]:
        bucket_id = int(bucket["id"])
        opened = parse_ts(bucket.get("opened_at"))
        deadline = parse_ts(bucket.get("deadline"))
        due = Cell(fmt_countdown(deadline, now), (deadline or 0.0, bucket_id), justify="right")
        age = Cell(fmt_age(opened, now), (-(opened or 0.0), bucket_id), justify="right")
        return age, due

    def tick(self) -> None:
        if not self._buckets:
            return
        now = self.console.now()

        def cells(key: str) -> dict[str, Cell]:
            age, due = self._clock_cells(self._buckets[key], now)
            return {"open": age, "due": due}

        self.query_one("#bucket-table", KeyedTable).update_columns(("open", "due"), cells)

    # -- actions ------------------------------------------------------------------------------

    def selected_bucket(self) -> dict[str, Any] | None:
        key = self.query_one("#bucket-table", KeyedTable).cursor_key
        return self._buckets.get(key) if key is not None else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if allowed and action == "close_bucket" and self.is_mounted and self.selected_bucket() is None:
            return None
        return allowed

    def action_close_bucket(self) -> None:
        bucket = self.selected_bucket()
        if bucket is None:
            return
        who = bucket.get("patient_id") or uid_tail(bucket.get("study_instance_uid"))
        self.console.ask_then_post(
            f"Close bucket {bucket['id']} ({bucket.get('app_id')}, {who}, "
            f"{bucket.get('instance_count')} instances) now and start its job?",
            f"/v1/buckets/{bucket['id']}/close",
            f"bucket {bucket['id']} closed",
            confirm="Close",
        )

    def on_data_table_row_highlighted(self, event: KeyedTable.RowHighlighted) -> None:
        self.refresh_bindings()
