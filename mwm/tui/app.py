"""The live console: a Textual application that watches and steers a running mwm over its HTTP API.

``run_tui`` is what ``mwm tui`` calls. :class:`MwmApp` owns one :class:`~mwm.tui.data.Feed` (run as
a worker, in the app's event loop) and a :class:`~mwm.tui.data.Store`; each update the feed
delivers is merged into the store and shown by the four panes (overview, jobs, applications,
sinks), which change their tables in place. A one-second tick recomputes what depends on the
clock: ages, countdowns and the "retrying in" of the unreachable banner.

The clock is injected (``clock=``) and every time shown is computed from it, so a test can freeze
time; ``display_url=`` fixes the address shown in the top bar.

Whatever the client raises is shown in the unreachable banner (see ``Feed``); an error the console
does not expect stops it, and is printed without local variables and with the token blanked out
(``crash``). ``run_tui`` refuses to start outside a terminal.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, TextIO

from rich.console import RenderableType
from rich.segment import Segments
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, TabbedContent, TabPane

from ..client import Client, ClientError
from .apps import AppsPane
from .crash import crash_report, safe_renderable
from .data import Feed, LinkStatus, Role, Store, Unreachable, Update
from .fmt import clip, light_terminal, retry_text
from .jobs import JobsPane
from .overview import OverviewPane
from .sinks import SinksPane
from .widgets import Banner, ConfirmScreen, Pane, TopBar, theme_colour

THEMES = {"dark": "textual-dark", "light": "textual-light"}
TABS = ("overview", "jobs", "apps", "sinks")


class FeedUpdated(Message):
    def __init__(self, update: Update) -> None:
        super().__init__()
        self.update = update


class LinkChanged(Message):
    def __init__(self, status: LinkStatus) -> None:
        super().__init__()
        self.status = status


class RoleKnown(Message):
    def __init__(self, role: Role | None) -> None:
        super().__init__()
        self.role = role


class EventSeen(Message):
    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__()
        self.event = event


class MwmApp(App[int]):
    """``MwmApp(url, token).run()``; see the module's docstring."""

    TITLE = "mwm"
    # Textual declares it as an instance attribute, so it cannot be annotated ClassVar here.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (150, "-wide")]  # noqa: RUF012
    CSS = (
        """
    Screen { layout: vertical; }
    TabbedContent { height: 1fr; }
    TabbedContent > ContentSwitcher { height: 1fr; }
    TabbedContent > ContentSwitcher > TabPane { padding: 0; height: 1fr; }
    """
        + JobsPane.WIDE_CSS
    )
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("1", "show_tab('overview')", "Overview", show=False),
        Binding("2", "show_tab('jobs')", "Jobs", show=False),
        Binding("3", "show_tab('apps')", "Apps", show=False),
        Binding("4", "show_tab('sinks')", "Sinks", show=False),
        Binding("f5,ctrl+r", "reconnect", "Refresh"),
        Binding("question_mark", "keys", "Keys"),
    ]

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        theme: str | None = None,
        clock: Callable[[], float] = time.time,
        display_url: str | None = None,
        client_factory: Callable[[str, str | None], Client] = Client,
        feed_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        self.token = token
        self.clock = clock
        self.display_url = display_url or self.url
        self.client_factory = client_factory
        self.feed_options = dict(feed_options or {})
        self.store = Store()
        self._failure: BaseException | None = None
        self.role: Role | None = None
        self.link = LinkStatus("connecting")
        self.last_event: dict[str, Any] | None = None
        self._shown_link: tuple[Text, str] | None = None
        #: (topics that changed, seconds it took to show them), most recent last.
        self.apply_times: deque[tuple[frozenset[str], float]] = deque(maxlen=2000)
        self.feed = Feed(self.url, token, self, clock=clock, client_factory=client_factory, **self.feed_options)
        if theme is None:
            theme = "light" if light_terminal(os.environ.get("COLORFGBG")) else "dark"
        self.theme = THEMES.get(theme, theme)

    # -- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield TopBar(id="top")
        yield Banner(id="banner")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("1 Overview", id="overview"):
                yield OverviewPane(id="overview-pane")
            with TabPane("2 Jobs", id="jobs"):
                yield JobsPane(id="jobs-pane")
            with TabPane("3 Applications", id="apps"):
                yield AppsPane(id="apps-pane")
            with TabPane("4 Sinks", id="sinks"):
                yield SinksPane(id="sinks-pane")
        yield Footer(show_command_palette=False)

    @property
    def main_screen(self) -> Screen[Any]:
        """The console's screen (``query_one`` on the app searches the screen on top, maybe a dialog)."""
        return self.screen_stack[0]

    @property
    def panes(self) -> list[Pane]:
        """The four panes; none while the app starts or shuts down."""
        return list(self.main_screen.query(Pane)) if self.is_running and self.screen_stack else []

    def pane(self, tab: str) -> Pane:
        return self.main_screen.query_one(f"#{tab}-pane", Pane)

    def on_mount(self) -> None:
        self._show_link()
        self.run_worker(self.feed.run(), name="feed", group="feed", exit_on_error=True)
        self.set_interval(1.0, self._tick, name="tick")
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        self.call_after_refresh(self._focus_pane, "overview")

    # -- what the feed reports (called in the app's loop, by the feed's worker) -----------------

    def feed_update(self, update: Update) -> None:
        self.post_message(FeedUpdated(update))

    def feed_link(self, status: LinkStatus) -> None:
        self.post_message(LinkChanged(status))

    def feed_event(self, event: dict[str, Any]) -> None:
        self.post_message(EventSeen(event))

    def feed_role(self, role: Role | None) -> None:
        self.post_message(RoleKnown(role))

    def on_feed_updated(self, message: FeedUpdated) -> None:
        started = time.perf_counter()
        changed = self.store.merge(message.update)
        if changed:
            for pane in self.panes:
                if pane.ready:
                    pane.show(self.store, changed)
            self.apply_times.append((frozenset(changed), time.perf_counter() - started))
        self._show_link()

    def on_link_changed(self, message: LinkChanged) -> None:
        self.link = message.status
        self._show_link()

    def on_role_known(self, message: RoleKnown) -> None:
        self.role = message.role
        self._show_link()
        for pane in self.panes:
            pane.refresh_bindings()
        for widget in self.main_screen.query("DeliveryTable"):
            widget.refresh_bindings()

    def on_event_seen(self, message: EventSeen) -> None:
        self.last_event = message.event
        self._show_link()

    # -- the clock ----------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def _tick(self) -> None:
        if not self.is_running or not self.screen_stack:
            return
        self._show_link()
        active = self.main_screen.query_one(TabbedContent).active
        if active:
            self.pane(active).tick()

    def _theme_changed(self, _theme: object) -> None:
        for pane in self.panes:
            if pane.ready:
                pane.show(self.store, set(pane.TOPICS))
        self._show_link()

    # -- the top bar and the banner -----------------------------------------------------------

    def _show_link(self) -> None:
        if not self.is_running or not self.screen_stack or not self.main_screen.query(TopBar):
            return
        status = self.link
        top = Text(no_wrap=True, overflow="ellipsis")
        top.append("mwm", style="bold")
        top.append(f"  {self.display_url}  ")
        colours = {
            "live": ("● live", "text-success"),
            "polling": ("◌ polling every 2 s", "text-warning"),
            "down": ("✕ unreachable", "text-error"),
            "connecting": ("… connecting", "text-secondary"),
        }
        label, colour = colours[status.state]
        top.append(label, style=theme_colour(self, colour))
        if self.role == "read":
            top.append("  read-only", style="bold " + theme_colour(self, "text-warning"))
        if self.last_event and status.state != "down":
            top.append("  · " + clip(str(self.last_event.get("message") or ""), 80), style="dim")
        banner_text = ""
        if status.state == "down":
            what = "refused the token" if status.unauthorized else "unreachable"
            banner_text = f"mwm at {self.display_url} {what} — {retry_text(status.retry_at, self.now())}"
            if status.error:
                banner_text += f"  ({clip(status.error, 80)})"
        if (top, banner_text) == self._shown_link:
            return  # repaint only what changed
        self._shown_link = (top, banner_text)
        self.main_screen.query_one(TopBar).update(top)
        banner = self.main_screen.query_one(Banner)
        if banner_text:
            banner.update(banner_text)
        banner.set_class(bool(banner_text), "-shown")

    # -- actions ------------------------------------------------------------------------------

    def watch_job(self, job_id: int | None) -> None:
        self.store.watch(job_id)
        self.feed.watch_job(job_id)

    def ask_then_post(self, question: str, path: str, done: str, *, confirm: str = "Yes") -> None:
        """Ask, and on "yes" send ``POST path`` in a worker; report the outcome as a notification."""
        if self.role == "read":
            self.notify("This token may only read.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._post(path, done), group="actions", exit_on_error=False)

        self.push_screen(ConfirmScreen(question, confirm), answered)

    async def _post(self, path: str, done: str) -> None:
        try:
            await self.feed.post(path)
        except ClientError as exc:
            detail = f": {exc.detail}" if exc.detail else ""
            self.notify(f"{exc.message}{detail}", title=f"Refused (HTTP {exc.status})", severity="error")
        except Unreachable as exc:
            self.notify(exc.message, title="mwm unreachable", severity="error")
        else:
            self.notify(done)

    def action_show_tab(self, tab: str) -> None:
        self.main_screen.query_one(TabbedContent).active = tab  # TabActivated focuses its pane

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.tabbed_content.id != "tabs" or event.pane.id is None:
            return
        self.call_after_refresh(self._focus_pane, event.pane.id)

    def _focus_pane(self, tab: str) -> None:
        # Only for the tab still shown: focusing a widget in another tab would switch to that
        # tab (TabbedContent follows the focus), and two late calls would then switch back and
        # forth for ever.
        if not self.is_running or not self.screen_stack:
            return
        if self.main_screen.query_one(TabbedContent).active != tab:
            return
        pane = self.pane(tab)
        pane.tick()
        widget = pane.main_widget()
        if widget is not None and not pane.has_focus_within:
            widget.focus()

    def action_reconnect(self) -> None:
        self.feed.reconnect_now()

    def action_keys(self) -> None:
        if self.screen.query("KeyPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    # -- errors nobody expected ---------------------------------------------------------------
    # Textual stops on them and prints a traceback with every frame's local variables, among
    # which the client's headers, and so the token: here they are printed by crash_report.

    @property
    def secrets(self) -> tuple[str | None, ...]:
        """What must never be shown."""
        return (self.token,)

    def _handle_exception(self, error: Exception) -> None:
        self._failure = error
        super()._handle_exception(error)

    def _fatal_error(self) -> None:
        error = sys.exception() or self._failure
        self.bell()
        if error is not None:
            report = crash_report(error, self.secrets)
            self._exit_renderables.append(Segments(self.console.render(report, self.console.options)))
        self._close_messages_no_wait()

    def panic(self, *renderables: RenderableType) -> None:
        super().panic(*(safe_renderable(r, self.secrets) for r in renderables))


#: What ``mwm tui`` says, and its exit status (a usage error), when it is not run in a terminal.
NEEDS_TERMINAL = (
    "mwm tui needs a terminal; use mwm jobs / mwm buckets / mwm apps / mwm sinks / mwm deliveries for plain output"
)
EXIT_NOT_A_TERMINAL = 2


def is_terminal(stream: object) -> bool:
    """Whether ``stream`` is a terminal (a closed, missing or odd stream is not)."""
    isatty = getattr(stream, "isatty", None)
    if not callable(isatty):
        return False
    try:
        return bool(isatty())
    except (OSError, ValueError):
        return False


def run_tui(
    *,
    url: str,
    token: str | None = None,
    theme: str | None = None,
    cafile: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the console until the user quits; the exit status.

    The console draws on the whole screen and reads the keyboard: with any of the standard
    streams (``sys``'s by default) redirected to a file or a pipe, it says so on ``stderr`` and
    returns :data:`EXIT_NOT_A_TERMINAL` without starting.
    """
    streams = (
        sys.stdin if stdin is None else stdin,
        sys.stdout if stdout is None else stdout,
        sys.stderr if stderr is None else stderr,
    )
    if not all(is_terminal(stream) for stream in streams):
        print(NEEDS_TERMINAL, file=streams[2])
        return EXIT_NOT_A_TERMINAL
    app = MwmApp(url, token, theme=theme, client_factory=functools.partial(Client, cafile=cafile))
    app.run()
    return app.return_code or 0
