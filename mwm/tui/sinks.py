"""The sinks: where results go, how many deliveries are in each state, and those that need a look."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Label, Static

from .data import APPS, DELIVERIES, SINKS, Store
from .fmt import DASH
from .widgets import Cell, DeliveryTable, KeyedTable, Pane, delivery_row, number_cell, theme_colour

SINK_COLUMNS = [
    ("id", "Sink"),
    ("kind", "Kind"),
    ("delivered", "Delivered"),
    ("pending", "Pending"),
    ("failed", "Failed"),
    ("skipped", "Skipped"),
    ("apps", "Used by"),
]
HIDDEN_KEYS = {"id", "kind", "deliveries", "pulled"}


class SinksPane(Pane):
    """Sinks with delivery counts; the highlighted sink's settings and its pending or failed deliveries."""

    DEFAULT_CSS = """
    SinksPane #sink-table { height: auto; max-height: 40%; }
    SinksPane #sink-detail { height: auto; padding: 0 1; border-top: solid $primary 40%; }
    SinksPane #sink-deliveries { height: 1fr; min-height: 3; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sinks: dict[str, dict[str, Any]] = {}
        self._users: dict[str, list[str]] = {}
        self._deliveries: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Label("Sinks (all deliveries)", classes="caption")
        yield KeyedTable(SINK_COLUMNS, sort="id", id="sink-table")
        yield Static("", id="sink-detail")
        yield Label("Pending and failed deliveries", id="deliveries-caption", classes="caption")
        yield DeliveryTable(id="sink-deliveries", sort="id", reverse=True)

    def main_widget(self) -> Widget:
        return self.query_one("#sink-table", KeyedTable)

    def show(self, store: Store, changed: set[str]) -> None:
        if not changed & {SINKS, APPS, DELIVERIES}:
            return
        if store.apps is not None:
            users: dict[str, list[str]] = {}
            for app in store.apps:
                for sink in app.get("sinks") or []:
                    users.setdefault(str(sink), []).append(str(app["id"]))
            self._users = users
        if store.sinks is not None:
            self._sinks = {str(s["id"]): s for s in store.sinks}
        if store.deliveries is not None:
            self._deliveries = store.deliveries
        table = self.query_one("#sink-table", KeyedTable)
        table.sync({key: self._row(sink) for key, sink in self._sinks.items()})
        self._show_selected()

    def _row(self, sink: dict[str, Any]) -> tuple[Cell, ...]:
        counts = sink.get("deliveries") or {}
        failed = int(counts.get("failed", 0))
        users = self._users.get(str(sink["id"])) or []
        kind = str(sink.get("kind") or DASH) + (" (pull)" if sink.get("pulled") and sink.get("kind") != "pull" else "")
        return (
            Cell(str(sink["id"])),
            Cell(kind),
            number_cell(int(counts.get("delivered", 0))),
            number_cell(int(counts.get("pending", 0))),
            Cell(
                Text(f"{failed:,}", style=theme_colour(self.app, "text-error") if failed else ""),
                failed,
                justify="right",
            ),
            number_cell(int(counts.get("skipped", 0))),
            Cell(", ".join(users) if users else DASH),
        )

    def _show_selected(self) -> None:
        key = self.query_one("#sink-table", KeyedTable).cursor_key
        sink = self._sinks.get(key) if key else None
        self.query_one("#sink-detail", Static).update(self._detail(sink) if sink else Text("No sink.", "dim"))
        rows = {}
        deliveries = {}
        for delivery in self._deliveries:
            if sink is None or delivery.get("sink_id") != sink["id"]:
                continue
            key = str(delivery["id"])
            deliveries[key] = delivery
            rows[key] = delivery_row(delivery, self.app, f"result {delivery.get('result_id')}")
        caption = f"Pending and failed deliveries to {sink['id']}" if sink else "Pending and failed deliveries"
        self.query_one("#deliveries-caption", Label).update(f"{caption} ({len(rows)})")
        self.query_one("#sink-deliveries", DeliveryTable).show_rows(rows, deliveries)

    def _detail(self, sink: dict[str, Any]) -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        how = "results wait for a consumer to fetch them" if sink.get("pulled") else "mwm sends the results"
        grid.add_row("sink", Text(f"{sink['id']} · {sink.get('kind')} · {how}"))
        for key, value in sink.items():
            if key in HIDDEN_KEYS or value in (None, "", [], {}):
                continue
            shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
            grid.add_row(key.replace("_", " "), Text(shown))
        counts = sink.get("deliveries") or {}
        grid.add_row("deliveries", Text(", ".join(f"{n:,} {s}" for s, n in sorted(counts.items())) or "none yet"))
        return grid

    def on_data_table_row_highlighted(self, event: KeyedTable.RowHighlighted) -> None:
        if event.data_table.id == "sink-table":
            self._show_selected()
