"""Widgets shared by the screens: a keyed table updated in place, the status bars, the confirmation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from rich.console import JustifyMethod
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, DataTable, Label, Static
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowDoesNotExist

from .fmt import DASH, RETRYABLE_DELIVERY_STATES, clip

if TYPE_CHECKING:
    from .data import Store

#: Colours of job and delivery states: theme variables made to be read as text on the background.
STATE_COLOURS = {
    "scheduled": "text-secondary",
    "launching": "text-accent",
    "running": "text-accent",
    "collecting": "text-accent",
    "succeeded": "text-success",
    "delivered": "text-success",
    "failed": "text-error",
    "pending": "text-warning",
}
#: States shown dimmed: over, and nothing went wrong that needs a look.
DIM_STATES = frozenset({"cancelled", "skipped"})


class Cell:
    """A table cell: what is shown, and the value it sorts by (so ``5m`` sorts after ``40s``)."""

    __slots__ = ("sort", "text")

    def __init__(self, text: str | Text, sort: Any = None, *, justify: JustifyMethod | None = None) -> None:
        if isinstance(text, str):
            text = Text(text, no_wrap=True, end="", overflow="ellipsis")
        if justify is not None:
            text.justify = justify
        self.text = text
        self.sort = text.plain if sort is None else sort

    def __rich__(self) -> Text:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and self.text == other.text and self.sort == other.sort

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Cell({self.text.plain!r})"


def number_cell(value: int | None, *, zero: str = "0") -> Cell:
    if value is None:
        return Cell(DASH, -1, justify="right")
    return Cell(f"{value:,}" if value else zero, value, justify="right")


class KeyedTable(DataTable[Cell]):
    """A ``DataTable`` whose rows are identified by key and updated in place.

    :meth:`sync` adds, updates (cell by cell, only what changed) and removes rows; the table is
    never cleared and rebuilt, so the cursor, the scroll position and the sort survive updates.
    A click on a column header, or :meth:`cycle_sort`, sorts by that column.
    """

    DEFAULT_CSS = """
    KeyedTable { height: 1fr; }
    """

    def __init__(
        self,
        columns: Sequence[tuple[str, str]],
        *,
        sort: str | None = None,
        reverse: bool = False,
        follow_top: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        #: With the cursor on the first row, stay on the first row when rows come in above it
        #: (the newest job, say) instead of following the row it was on.
        self.follow_top = follow_top
        self._column_spec = list(columns)
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._essence: dict[str, dict[str, Any]] = {}
        self.sort_column = sort or columns[0][0]
        self.sort_reverse = reverse

    def on_mount(self) -> None:
        for key, label in self._column_spec:
            self.add_column(label, key=key)
        self._show_sort()

    # -- rows ---------------------------------------------------------------------------------

    def cells_of(self, key: str) -> tuple[Cell, ...] | None:
        return self._cells.get(key)

    def rows_for(
        self,
        items: Mapping[str, Mapping[str, Any]],
        make: Callable[[Mapping[str, Any]], tuple[Cell, ...]],
        *,
        ignore: frozenset[str] = frozenset(),
    ) -> dict[str, tuple[Cell, ...]]:
        """Rows for :meth:`sync`: made again only for items that changed since the last call.

        ``ignore`` names fields that change on every answer without changing the row (times the
        server computed when it answered; the clock columns are the tick's business).
        """
        rows: dict[str, tuple[Cell, ...]] = {}
        seen: dict[str, dict[str, Any]] = {}
        for key, item in items.items():
            essence = {k: v for k, v in item.items() if k not in ignore}
            old = self._cells.get(key)
            if old is not None and self._essence.get(key) == essence:
                rows[key] = old
            else:
                rows[key] = make(item)
            seen[key] = essence
        self._essence = seen
        return rows

    def sync(self, rows: Mapping[str, tuple[Cell, ...]]) -> None:
        """Make the table show exactly ``rows`` (key → cells), changing only what differs."""
        keep = None if self.follow_top and self.row_count and self.cursor_row == 0 else self.cursor_key
        moved = False
        for key in [k for k in self._cells if k not in rows]:
            self.remove_row(key)
            del self._cells[key]
            moved = True
        columns = [key for key, _ in self._column_spec]
        sort_index = columns.index(self.sort_column)
        for key, cells in rows.items():
            old = self._cells.get(key)
            if old is None:
                self.add_row(*cells, key=key)
                self._grow_columns(columns, cells)
                moved = True
            elif old != cells:
                for column, before, after in zip(columns, old, cells, strict=True):
                    if before != after:
                        self._set_cell(key, column, after)
                moved = moved or old[sort_index].sort != cells[sort_index].sort
            self._cells[key] = cells
        if moved:
            self._resort(keep)

    def update_columns(
        self, columns: Iterable[str], make: Callable[[str], Mapping[str, Cell]], *, visible_only: bool = True
    ) -> None:
        """Recompute some columns (ages, countdowns) of the rows on screen, or of every row."""
        keys = self.visible_keys() if visible_only else list(self._cells)
        wanted = list(columns)
        names = [key for key, _ in self._column_spec]
        for key in keys:
            old = self._cells.get(key)
            if old is None:
                continue
            fresh = make(key)
            cells = list(old)
            for column in wanted:
                cell = fresh.get(column)
                index = names.index(column)
                if cell is not None and cell != cells[index]:
                    cells[index] = cell
                    self._set_cell(key, column, cell)
            self._cells[key] = tuple(cells)

    def _grow_columns(self, columns: Sequence[str], cells: Sequence[Cell]) -> None:
        # DataTable measures new rows when it is next idle; widening the columns now means the
        # frame drawn before that does not show the new row clipped.
        for column, cell in zip(columns, cells, strict=True):
            spec = self.columns[ColumnKey(column)]
            spec.content_width = max(spec.content_width, cell.text.cell_len)

    def _set_cell(self, key: str, column: str, cell: Cell) -> None:
        # Columns only grow: asking DataTable to fit a narrower value makes it measure the whole
        # column again, which with a thousand rows ticking every second is what freezes a screen.
        grow = cell.text.cell_len > self.columns[ColumnKey(column)].content_width
        self.update_cell(key, column, cell, update_width=grow)

    def visible_keys(self) -> list[str]:
        if not self.row_count:
            return []
        first = int(self.scroll_offset.y)
        height = max(1, self.size.height - (1 if self.show_header else 0))
        keys = []
        for row in range(first, min(self.row_count, first + height + 1)):
            try:
                keys.append(str(self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value))
            except CellDoesNotExist:
                break
        return keys

    @property
    def cursor_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return str(self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value)
        except CellDoesNotExist:
            return None

    def move_to(self, key: str | None) -> None:
        if key is None:
            return
        try:
            self.move_cursor(row=self.get_row_index(key), scroll=False)
        except RowDoesNotExist:
            pass

    # -- sorting ------------------------------------------------------------------------------

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else False
        self.sort_column, self.sort_reverse = column, reverse
        self._show_sort()
        self._resort(self.cursor_key)

    def cycle_sort(self) -> None:
        names = [key for key, _ in self._column_spec]
        self.sort_by(names[(names.index(self.sort_column) + 1) % len(names)], self.sort_reverse)

    def _resort(self, keep: str | None) -> None:
        if self.row_count:
            self.sort(self.sort_column, key=lambda cell: cell.sort, reverse=self.sort_reverse)
        if keep is None and self.row_count:
            self.move_cursor(row=0, scroll=False)
        else:
            self.move_to(keep)

    def _show_sort(self) -> None:
        for key, label in self._column_spec:
            column = self.columns.get(ColumnKey(key))
            if column is None:
                continue
            marker = (" ▼" if self.sort_reverse else " ▲") if key == self.sort_column else ""
            column.label = Text(label + marker)
            column.content_width = max(column.content_width, column.label.cell_len)
        self.refresh()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(str(event.column_key.value))


def theme_colour(app: Any, name: str) -> str:
    """A colour of the current theme (``text-error``…) as a Rich colour, or ``""``."""
    colour = str(app.theme_variables.get(name, "")) if app is not None else ""
    return colour if len(colour) == 7 else ""  # Rich reads #RRGGBB, not #RRGGBBAA


def state_text(state: str | None, app: Any) -> Text:
    """A state coloured from the current theme (so it reads in dark and light themes)."""
    if not state:
        return Text("—")
    style = "dim" if state in DIM_STATES else theme_colour(app, STATE_COLOURS.get(state, ""))
    return Text(state, style=style, no_wrap=True, end="")


class TopBar(Static):
    """One line at the top: mwm's address, how the console is connected, the token's role."""

    DEFAULT_CSS = """
    TopBar { height: 1; background: $panel; color: $foreground; padding: 0 1; }
    """


class Banner(Static):
    """A line shown only while mwm cannot be reached."""

    DEFAULT_CSS = """
    Banner { height: auto; background: $error; color: $text; padding: 0 1; display: none; }
    Banner.-shown { display: block; }
    """


class ConfirmScreen(ModalScreen[bool]):
    """ "Are you sure?" for every action that changes something; ``y``/``n``, Enter, Escape or a click."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 64; max-width: 90%; height: auto; border: thick $warning; background: $surface; padding: 1 2;
    }
    ConfirmScreen #question { width: 100%; height: auto; margin-bottom: 1; }
    ConfirmScreen Horizontal { align: center middle; height: 3; }
    ConfirmScreen Button { margin: 0 2; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, confirm: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.confirm = confirm

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question")
            with Horizontal():
                yield Button(f"{self.confirm} (y)", variant="warning", id="yes")
                yield Button("No (n)", variant="default", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Console(Protocol):
    """What the panes need from the app (:class:`mwm.tui.app.MwmApp`)."""

    role: str | None
    store: Store

    def now(self) -> float: ...

    def ask_then_post(self, question: str, path: str, done: str, *, confirm: str = "Yes") -> None: ...

    def watch_job(self, job_id: int | None) -> None: ...


class Pane(Vertical):
    """One tab of the console: shows the store, ticks every second, hides actions from readers."""

    DEFAULT_CSS = """
    Pane { height: 1fr; }
    Pane .caption { height: 1; padding: 0 1; color: $text-primary; text-style: bold; }
    """

    #: Actions that change something in mwm: hidden for a read-only token.
    WRITE_ACTIONS: ClassVar[frozenset[str]] = frozenset()
    #: Every topic a pane may show (what :meth:`show` gets when the pane first appears).
    TOPICS: ClassVar[frozenset[str]] = frozenset(
        {"stats", "buckets", "jobs", "apps", "sinks", "deliveries", "job", "log"}
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Set once the pane and its children are mounted: updates before that wait in the store.
        self.ready = False

    @property
    def console(self) -> Console:
        return cast(Console, self.app)

    def on_mount(self) -> None:
        self.ready = True
        self.show(self.console.store, set(self.TOPICS))

    def show(self, store: Store, changed: set[str]) -> None:
        """Bring the pane up to date with ``store``; ``changed`` says which topics changed."""

    def tick(self) -> None:
        """Once a second: recompute what depends on the clock (ages, countdowns)."""

    def main_widget(self) -> Widget | None:
        """What gets the focus when the pane is shown."""
        return None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.WRITE_ACTIONS and self.console.role == "read":
            return False
        return True


DELIVERY_COLUMNS = [
    ("id", "Delivery"),
    ("job", "Job"),
    ("file", "File"),
    ("sink", "Sink"),
    ("state", "State"),
    ("tries", "Tries"),
    ("error", "Last error"),
]


class DeliveryTable(KeyedTable):
    """Deliveries (one row each, keyed by id) with the "retry delivery" action."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("d", "retry_delivery", "Retry delivery")]

    def __init__(self, columns: Sequence[tuple[str, str]] = DELIVERY_COLUMNS, **kwargs: Any) -> None:
        super().__init__(columns, **kwargs)
        self.deliveries: dict[str, dict[str, Any]] = {}

    def show_rows(self, rows: Mapping[str, tuple[Cell, ...]], deliveries: Mapping[str, dict[str, Any]]) -> None:
        self.deliveries = dict(deliveries)
        self.sync(rows)
        self.refresh_bindings()

    def selected(self) -> dict[str, Any] | None:
        key = self.cursor_key
        return self.deliveries.get(key) if key is not None else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "retry_delivery":
            if cast(Console, self.app).role == "read":
                return False
            delivery = self.selected()
            return True if delivery is not None and delivery.get("state") in RETRYABLE_DELIVERY_STATES else None
        return True

    def action_retry_delivery(self) -> None:
        delivery = self.selected()
        if delivery is None or delivery.get("state") not in RETRYABLE_DELIVERY_STATES:
            self.app.bell()
            return
        cast(Console, self.app).ask_then_post(
            f"Retry delivery {delivery['id']} (job {delivery.get('job_id')}) to sink {delivery.get('sink_id')}?",
            f"/v1/deliveries/{delivery['id']}/retry",
            f"delivery {delivery['id']} queued again",
            confirm="Retry",
        )

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.refresh_bindings()


def delivery_row(delivery: Mapping[str, Any], app: Any, file: str | None = None) -> tuple[Cell, ...]:
    delivery_id = int(delivery["id"])
    state = str(delivery.get("state") or "")
    return (
        number_cell(delivery_id),
        number_cell(delivery.get("job_id")),
        Cell(file or DASH, (file or "", delivery_id)),
        Cell(str(delivery.get("sink_id") or DASH), (str(delivery.get("sink_id") or ""), delivery_id)),
        Cell(state_text(state, app), (state, delivery_id)),
        number_cell(int(delivery.get("attempts") or 0)),
        Cell(clip(delivery.get("last_error"), 60), (delivery.get("last_error") or "", delivery_id)),
    )
