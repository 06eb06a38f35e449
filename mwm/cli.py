"""The ``mwm`` command: ``serve`` runs the service; every other command is a client of its HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .client import DEFAULT_URL, Client, ClientError, normalise_url
from .db import DELIVERY_STATES, JOB_STATES
from .errors import ConfigError, MwmError

if TYPE_CHECKING:
    from .send import SendSummary

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: The width of output that is not a terminal: a row is one line, whatever its length.
UNLIMITED_WIDTH = 1 << 20

#: A table column is cut down to no fewer characters than this (or its header's) on a narrow terminal.
MIN_CUT_WIDTH = 12

#: Characters between two table columns.
TABLE_GAP = 2


def _console() -> Any:
    """Where the commands print: on a terminal, its width; piped or redirected, lines are never
    wrapped or cut, so that ``grep`` and ``awk`` see one row per line."""
    from rich.console import Console

    try:
        terminal = os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        terminal = False
    return Console() if terminal else Console(width=UNLIMITED_WIDTH)


def _age(iso_text: str | None) -> str:
    if not iso_text:
        return "-"
    seconds = time.time() - datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()
    return _duration(seconds) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _fit(natural: Sequence[int], floors: Sequence[int], available: int) -> list[int]:
    """Column widths within ``available``: the widest columns are cut first, none below its floor."""
    widths = list(natural)
    while sum(widths) > available:
        cuttable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not cuttable:
            break  # the floors alone are too wide: the terminal wraps the rows
        widest = max(cuttable, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def _table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    cut_first: Sequence[str] = (),
    console: Any = None,
) -> None:
    """A table, one row per line. Cells are never wrapped; on a terminal too narrow for it, the
    widest columns end with an ellipsis (those of ``cut_first`` before the others), so that
    words, ids and UIDs are never split. Piped or redirected (a console of
    :data:`UNLIMITED_WIDTH`), nothing is cut."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or _console()
    if not rows:  # rather than a header over nothing
        console.print(f"no {title}", highlight=False, markup=False, soft_wrap=True)
        return
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    natural = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    floors = [n if n <= MIN_CUT_WIDTH else max(MIN_CUT_WIDTH, len(c)) for n, c in zip(natural, columns, strict=True)]
    gaps = TABLE_GAP * (len(columns) - 1)
    keep = [n if c not in cut_first else f for n, f, c in zip(natural, floors, columns, strict=True)]
    widths = _fit(_fit(natural, keep, console.width - gaps), floors, console.width - gaps)
    table = Table(
        title=title,
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, TABLE_GAP - 1, 0, 0),
    )
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column, width=width, no_wrap=True, overflow="ellipsis")
    for row in cells:
        table.add_row(*row)
    if sum(widths) + gaps > console.width:
        # Even cut down, the rows are wider than the terminal: let it wrap them rather than cut more.
        console = Console(
            width=sum(widths) + gaps,
            file=console.file,
            force_terminal=console.is_terminal,
            color_system=console.color_system,
        )
    with console.capture() as captured:
        console.print(table, crop=False)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    console.file.flush()


# -- serve ------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_settings, naming_the_environment
    from .logs import configure
    from .service import Service

    config = args.config or (Path(os.environ["MWM_CONFIG"]) if os.environ.get("MWM_CONFIG") else None)
    try:
        settings = load_settings(config)
    except MwmError as exc:
        print(f"mwm: configuration error: {exc.message}" + (f" ({exc.detail})" if exc.detail else ""), file=sys.stderr)
        return EXIT_USAGE
    configure(args.log_level or settings.server.log_level, args.log_format or settings.server.log_format)
    from . import faults

    try:
        faults.configure(os.environ.get("MWM_FAULTS"))
    except ValueError as exc:
        print(f"mwm: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        service = Service(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, service.request_stop)
        try:
            await service.start()
            await service.wait()
        except ConfigError as exc:  # found while starting: a plugin's options, a sink, the address
            named = naming_the_environment(exc, settings.environment)
            print(
                f"mwm: configuration error: {named.message}" + (f" ({named.detail})" if named.detail else ""),
                file=sys.stderr,
            )
            return EXIT_USAGE
        except MwmError as exc:
            print(f"mwm: {exc.message}" + (f" ({exc.detail})" if exc.detail else ""), file=sys.stderr)
            return EXIT_FAILED
        except OSError as exc:
            print(f"mwm: cannot start: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    return asyncio.run(run())


# -- client commands ------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token, cafile=args.cacert)


def _speed_column() -> Any:
    """The progress bar's speed: the bar counts files, so files per second."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class FilesPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("? files/s" if speed is None else f"{speed:.0f} files/s", style="progress.data.speed")

    return FilesPerSecond()


def _describe(exc: ClientError) -> str:
    """A client error in one line; a refused token says how to give one to the command line."""
    detail = "use --token or MWM_TOKEN" if exc.status == 401 else exc.detail
    return exc.message + (f" ({detail})" if detail else "")


def _counts(summary: SendSummary) -> str:
    text = (
        f"{summary.stored} stored, {summary.duplicate} duplicates, {summary.rejected} rejected, {summary.failed} failed"
    )
    return text + (f", {summary.skipped} skipped" if summary.skipped else "")


def _send_json(summary: SendSummary, elapsed: float) -> str:
    data: dict[str, Any] = {
        "files": summary.files,
        "stored": summary.stored,
        "duplicates": summary.duplicate,
        "rejected": summary.rejected,
        "failed": summary.failed,
        "seconds": round(elapsed, 3),
        "bytes": summary.sent_bytes,
        "reasons": dict(summary.reasons),
        "sent": summary.sent,
        "skipped": summary.skipped,
        "skip_reasons": dict(summary.skip_reasons),
        "problems": [p.to_json() for p in summary.sorted_problems()],
        "routed": dict(sorted(summary.routed.items())),
        "unrouted": summary.unrouted,
    }
    if summary.error is not None:
        data["error"] = _describe(summary.error)
    return json.dumps(data)


def cmd_send(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .send import find_files, send

    try:
        files = find_files(Path(p) for p in args.paths)
    except FileNotFoundError as exc:
        print(f"mwm send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not files:
        print("mwm send: no files to send", file=sys.stderr)
        return EXIT_USAGE
    console = _console()
    started = time.perf_counter()

    async def run() -> SendSummary:
        with Progress(
            TextColumn("sending"),
            BarColumn(),
            MofNCompleteColumn(),
            _speed_column(),
            TimeRemainingColumn(),
            console=console,
            disable=args.quiet or not console.is_terminal,
            transient=True,
        ) as progress:
            task = progress.add_task("send", total=len(files))
            async with _client(args) as client:
                return await send(
                    client,
                    files,
                    apps=args.app,
                    called_aet=args.called_aet,
                    calling_aet=args.calling_aet,
                    correlation_id=args.correlation_id,
                    concurrency=args.concurrency,
                    batch_size=args.batch,
                    on_progress=lambda n, size: progress.update(task, advance=n),
                )

    summary = asyncio.run(run())
    elapsed = time.perf_counter() - started
    if args.json:
        print(_send_json(summary, elapsed))
    if summary.error is not None:
        # Every other file would have met the same error: one message, not one per file.
        print(f"mwm send: {_describe(summary.error)}", file=sys.stderr)
        if summary.sent or summary.skipped:
            print(
                f"mwm send: stopped after {summary.sent} of {summary.files} files: {_counts(summary)}",
                file=sys.stderr,
            )
        return EXIT_FAILED
    if summary.sent == 0 and summary.skipped:
        print("mwm send: nothing sent: no DICOM Part-10 file among the files given", file=sys.stderr)
        _print_problems(console, summary, verbose=args.verbose)
        return EXIT_USAGE
    if not args.json:
        rate = summary.sent / elapsed if elapsed > 0 else 0.0
        console.print(
            f"sent {summary.sent} files ({summary.sent_bytes / 1e6:.1f} MB) in {elapsed:.2f}s ({rate:.0f} files/s): "
            f"[green]{summary.stored} stored[/], {summary.duplicate} duplicates, "
            f"[{'red' if summary.rejected else 'default'}]{summary.rejected} rejected[/], "
            f"[{'red' if summary.failed else 'default'}]{summary.failed} failed[/]"
            + (f", [yellow]{summary.skipped} skipped[/]" if summary.skipped else ""),
            soft_wrap=True,
            highlight=False,
        )
        _print_routing(console, summary)
        _print_problems(console, summary, verbose=args.verbose)
    return EXIT_OK if summary.ok else EXIT_FAILED


def _print_routing(console: Any, summary: SendSummary) -> None:
    """Which applications the stored instances went to, and how many no application took."""
    if summary.routed:
        routed = ", ".join(f"{app} ({count})" for app, count in sorted(summary.routed.items()))
        console.print(f"  routed to: {routed}", markup=False, highlight=False, soft_wrap=True)
    if summary.unrouted:
        console.print(
            f"  {summary.unrouted} matched no application: stored only, nothing will process them",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _print_problems(console: Any, summary: SendSummary, *, verbose: bool) -> None:
    """Every file not stored (``verbose``), or how many per reason with an example of each."""
    if verbose:
        for problem in summary.sorted_problems():
            console.print(
                f"  {problem.status:8}  {problem.path}: {problem.reason}", markup=False, highlight=False, soft_wrap=True
            )
        return
    for reason, count in summary.reasons.most_common():
        console.print(
            f"  {count} x {reason} (e.g. {summary.examples[reason]})", markup=False, highlight=False, soft_wrap=True
        )
    for reason, count in summary.skip_reasons.most_common():
        console.print(
            f"  {count} skipped: {reason} (e.g. {summary.examples[reason]})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if summary.problems:
        console.print("  (--verbose lists every file)", highlight=False, soft_wrap=True)


def _api(args: argparse.Namespace, action: Callable[[Client], Awaitable[int]]) -> int:
    async def run() -> int:
        async with _client(args) as client:
            return await action(client)

    return asyncio.run(run())


def cmd_jobs(args: argparse.Namespace) -> int:
    async def action(client: Client) -> int:
        if args.action in (None, "list"):
            data = await client.get("/v1/jobs", state=args.state, app=args.app, limit=args.limit)
            if args.json:
                print(json.dumps(data, indent=2))
                return EXIT_OK
            _table(
                "jobs",
                ["id", "app", "state", "attempt", "inst", "res", "created", "run", "error"],
                [
                    (
                        j["id"],
                        j["app_id"],
                        j["state"],
                        f"{j['attempt']}/{j['max_attempts']}",
                        j["instance_count"],
                        j["result_count"],
                        _age(j["created_at"]),
                        _duration(j["run_seconds"]),
                        j["error"].splitlines()[0] if j["error"] else None,  # what happened; the log has the rest
                    )
                    for j in data["jobs"]
                ],
                cut_first=["error"],
            )
            return EXIT_OK
        if args.id is None:
            print(f"mwm jobs {args.action}: a job id is required", file=sys.stderr)
            return EXIT_USAGE
        if args.action == "show":
            job = await client.get(f"/v1/jobs/{args.id}")
            if args.json:
                print(json.dumps(job, indent=2))
                return EXIT_OK
            _print_job(job)
            return EXIT_OK
        if args.action == "log":
            text = await client.request("GET", f"/v1/jobs/{args.id}/log", expect_json=False)
            sys.stdout.write(text.decode("utf-8", "replace"))
            return EXIT_OK
        job = await client.post(f"/v1/jobs/{args.id}/{args.action}")
        print(f"job {job['id']}: {job['state']}")
        return EXIT_OK

    return _api(args, action)


def _print_job(job: dict[str, Any]) -> None:
    from rich.markup import escape

    console = _console()
    console.print(
        f"[bold]job {job['id']}[/] {job['app_id']}  state=[bold]{job['state']}[/]  "
        f"attempt {job['attempt']}/{job['max_attempts']}",
        soft_wrap=True,
    )
    for label, key in (
        ("study", "study_instance_uid"),
        ("patient", "patient_id"),
        ("correlation id", "correlation_id"),
        ("created", "created_at"),
        ("started", "started_at"),
        ("finished", "finished_at"),
    ):
        console.print(f"  {label:15} {job.get(key) or '-'}", highlight=False, soft_wrap=True)
    console.print(f"  {'run time':15} {_duration(job['run_seconds'])}", highlight=False, soft_wrap=True)
    retrying = job["state"] == "scheduled" and job["attempt"] >= 1 and job.get("not_before")
    if retrying:
        console.print(
            f"  {'next attempt':15} {job['not_before']} (attempt {job['attempt'] + 1}/{job['max_attempts']})",
            highlight=False,
            soft_wrap=True,
        )
    if job.get("error"):
        label = "last error" if retrying else "error"
        # Its first line says what happened; the rest is the log's tail, printed below anyway.
        error = job["error"].splitlines()[0] if job.get("log_tail") else job["error"]
        console.print(f"  [red]{label}[/] {escape(error)}", markup=True, highlight=False, soft_wrap=True)
    for series in job.get("series", []):
        console.print(
            f"  series {series['series_instance_uid']} {series['modality']} "
            f"'{series['series_description']}': {series['instance_count']} instances",
            highlight=False,
            soft_wrap=True,
        )
    for result in job.get("results", []):
        console.print(
            f"  result {result['id']}: {result['path']} ({result['media_type']}, {result['size']} bytes)",
            highlight=False,
            soft_wrap=True,
        )
    for delivery in job.get("deliveries", []):
        console.print(
            f"  delivery {delivery['id']} result {delivery['result_id']} -> {delivery['sink_id']}: "
            f"{delivery['state']}" + (f" ({delivery['last_error']})" if delivery["last_error"] else ""),
            highlight=False,
            soft_wrap=True,
        )
    if job.get("result_data"):
        console.print(f"  result data: {json.dumps(job['result_data'])}", highlight=False, markup=False, soft_wrap=True)
    if job.get("log_tail"):
        console.print("  log (last lines):", highlight=False, soft_wrap=True)
        for line in job["log_tail"].splitlines():
            console.print(f"    {line}", highlight=False, markup=False, soft_wrap=True)


def cmd_apps(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {}
    if args.action in ("add", "update"):
        try:
            spec = _read_spec(Path(args.id), needs_id=args.action == "update")
        except SpecError as exc:
            print(f"mwm apps {args.action}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    async def action(client: Client) -> int:
        if args.action == "show":
            app = await client.get(f"/v1/apps/{args.id}")
            if args.json:
                print(json.dumps(app, indent=2))
            else:
                _print_app(app)
            return EXIT_OK
        if args.action == "delete":
            await client.delete(f"/v1/apps/{args.id}")
            print(f"application {args.id} deleted")
            return EXIT_OK
        if args.action in ("add", "update"):
            if args.action == "add":
                app = await client.post("/v1/apps", spec)
            else:
                app = await client.put(f"/v1/apps/{spec['id']}", spec)
            print(f"application {app['id']} saved")
            return EXIT_OK
        data = await client.get("/v1/apps")
        if args.json:
            print(json.dumps(data, indent=2))
            return EXIT_OK
        _table(
            "applications",
            ["id", "engine", "enabled", "match", "grouping", "timeout", "sinks", "origin"],
            [
                (
                    a["id"],
                    a["engine"],
                    "yes" if a["enabled"] else "no",
                    _rules(a["match"]),
                    a["grouping"],
                    _duration(a["timeout"]),
                    ", ".join(a["sinks"]) or "-",
                    a["origin"],
                )
                for a in data["apps"]
            ],
            cut_first=["match", "sinks"],
        )
        for app in data["apps"]:
            if app.get("problem"):
                print(f"application {app['id']} cannot run: {app['problem']}")
        return EXIT_OK

    return _api(args, action)


#: How ``apps show`` writes the values of these keys (the others as they come).
_APP_DURATIONS = ("timeout", "max_age", "run_timeout")


def _print_app(app: dict[str, Any]) -> None:
    """An application's table, one key per line, as ``jobs show`` writes a job."""
    console = _console()
    console.print(
        f"[bold]application {app['id']}[/] ({app['origin']})  engine={app['engine']}  "
        f"enabled={'yes' if app['enabled'] else 'no'}",
        soft_wrap=True,
        highlight=False,
    )
    lines: list[tuple[str, str]] = []
    if app.get("problem"):
        lines.append(("cannot run", str(app["problem"])))
    for key, value in app.items():
        if key in ("id", "origin", "engine", "enabled", "problem") or value in (None, "", [], {}):
            continue
        if key == "match":
            text = _rules(value)
        elif key in _APP_DURATIONS:
            text = _duration(value)
        elif isinstance(value, list):
            text = " ".join(str(v) for v in value) if key in ("command", "arguments") else ", ".join(map(str, value))
        elif isinstance(value, dict):
            text = " ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = str(value)
        lines.append((key.replace("_", " "), text))
    for label, text in lines:
        console.print(f"  {label:15} {text}", highlight=False, markup=False, soft_wrap=True)


class SpecError(Exception):
    """An application file that cannot be read; the message says why, in one line."""


def _read_spec(path: Path, *, needs_id: bool = False) -> dict[str, Any]:
    """An application from a TOML (``.toml``) or JSON file (one that ``needs_id`` names its id)."""
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data: Any = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except ValueError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected one application (a JSON object), not {type(data).__name__}")
    if needs_id and (not isinstance(data.get("id"), str) or not data["id"]):
        raise SpecError(f"{path}: the application has no id")
    return data


def _rules(match: dict[str, Any]) -> str:
    parts = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in match.items() if v]
    return " ".join(parts) or "everything"


def cmd_buckets(args: argparse.Namespace) -> int:
    async def action(client: Client) -> int:
        if args.action == "close":
            data = await client.post(f"/v1/buckets/{args.id}/close")
            print(f"bucket {args.id} closed: job {data['job']['id']} {data['job']['state']}")
            return EXIT_OK
        data = await client.get("/v1/buckets", app=args.app)
        if args.json:
            print(json.dumps(data, indent=2))
            return EXIT_OK
        _table(
            "open buckets",
            ["id", "app", "grouping", "study / group", "instances", "opened", "deadline in"],
            [
                (
                    b["id"],
                    b["app_id"],
                    b["grouping"],
                    b["group_uid"],
                    b["instance_count"],
                    _age(b["opened_at"]),
                    _duration(b["remaining_seconds"]),
                )
                for b in data["buckets"]
            ],
            cut_first=["study / group"],
        )
        return EXIT_OK

    return _api(args, action)


def cmd_sinks(args: argparse.Namespace) -> int:
    async def action(client: Client) -> int:
        data = await client.get("/v1/sinks")
        if args.json:
            print(json.dumps(data, indent=2))
            return EXIT_OK
        _table(
            "sinks",
            ["id", "kind", "pending", "delivered", "failed", "skipped"],
            [
                (
                    s["id"],
                    s["kind"],
                    *(s["deliveries"].get(k, 0) for k in ("pending", "delivered", "failed", "skipped")),
                )
                for s in data["sinks"]
            ],
        )
        return EXIT_OK

    return _api(args, action)


def cmd_deliveries(args: argparse.Namespace) -> int:
    if (args.action == "retry") != bool(args.ids):
        what = "give the ids of the deliveries to retry" if args.ids == [] else "ids go with retry only"
        print(f"mwm deliveries: {what}", file=sys.stderr)
        return EXIT_USAGE

    async def action(client: Client) -> int:
        if args.action == "retry":
            failures = 0
            for delivery_id in args.ids:
                try:
                    data = await client.post(f"/v1/deliveries/{delivery_id}/retry")
                except ClientError as exc:
                    if exc.unreachable:
                        raise
                    print(f"delivery {delivery_id}: {_describe(exc)}", file=sys.stderr)
                    failures += 1
                    continue
                print(f"delivery {data['id']}: {data['state']}")
            return EXIT_FAILED if failures else EXIT_OK
        data = await client.get("/v1/deliveries", state=args.state, sink=args.sink, limit=args.limit)
        if args.json:
            print(json.dumps(data, indent=2))
            return EXIT_OK
        _table(
            "deliveries",
            ["id", "job", "result", "sink", "state", "attempts", "next attempt", "last error"],
            [
                (
                    d["id"],
                    d["job_id"],
                    d["result_id"],
                    d["sink_id"],
                    d["state"],
                    d["attempts"],
                    d["next_attempt_at"],
                    d["last_error"],
                )
                for d in data["deliveries"]
            ],
            cut_first=["last error"],
        )
        return EXIT_OK

    return _api(args, action)


def _result_file_name(suggested: str | None, result_id: int) -> str:
    """The name the server suggests for a result, if it is a plain file name; else result-ID."""
    name = (suggested or "").replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name in (".", "..") or name.startswith(".") or any(not c.isprintable() for c in name):
        return f"result-{result_id}"
    return name


def cmd_results(args: argparse.Namespace) -> int:
    if args.action in ("get", "ack") and args.id is None:
        print(f"mwm results {args.action}: give the result's ID", file=sys.stderr)
        return EXIT_USAGE

    async def action(client: Client) -> int:
        if args.action == "get" and args.output == Path("-"):  # to standard output, for a pipe
            data = await client.request("GET", f"/v1/results/{args.id}", expect_json=False)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return EXIT_OK
        if args.action == "get":

            def target(suggested: str | None) -> Path:
                chosen = args.output or Path(_result_file_name(suggested, args.id))
                if chosen.is_dir():
                    chosen = chosen / _result_file_name(suggested, args.id)
                if chosen.exists() and not args.force:
                    raise ClientError(f"{chosen} exists", "choose another name with -o, or overwrite it with --force")
                return chosen

            path, size = await client.download(f"/v1/results/{args.id}", target)
            print(f"result {args.id}: {size} bytes saved to {path}")
            return EXIT_OK
        if args.action == "ack":
            data = await client.post(f"/v1/results/{args.id}/ack", {"sink": args.sink} if args.sink else None)
            if not data["acknowledged"]:
                where = f"pull sink {args.sink!r}" if args.sink else "any pull sink"
                print(f"mwm results ack: result {args.id} is not waiting on {where}", file=sys.stderr)
                return EXIT_FAILED
            print(f"result {args.id}: acknowledged on {data['acknowledged']} pull sink(s)")
            return EXIT_OK
        if args.sink:
            data = await client.get(f"/v1/sinks/{args.sink}/results", limit=args.limit)
        else:
            data = await client.get("/v1/results", job=args.job, limit=args.limit)
        if args.json:
            print(json.dumps(data, indent=2))
            return EXIT_OK
        _table(
            f"results waiting on {args.sink}" if args.sink else "results",
            ["id", "job", "path", "size", "media type", "created"],
            [(r["id"], r["job_id"], r["path"], r["size"], r["media_type"], r["created_at"]) for r in data["results"]],
            cut_first=["path"],
        )
        return EXIT_OK

    return _api(args, action)


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from .tui.app import run_tui
    except ImportError as exc:
        print(f"mwm tui needs the 'tui' extra (pip install 'mwm[tui]'): {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_tui(url=args.url, token=args.token, theme=args.theme, cafile=args.cacert)  # type: ignore[no-any-return]


def cmd_echo(args: argparse.Namespace) -> int:
    from .echo import run_echo, tls_context

    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_no_verify:
        try:
            tls = tls_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, verify=not args.tls_no_verify)
        except ValueError as exc:
            print(f"mwm echo: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return run_echo(args.target, calling_aet=args.calling_aet, timeout=args.timeout, count=args.count, tls=tls)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"mwm {__version__}")
    return EXIT_OK


def _positive(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _correlation_id(text: str) -> str:
    """An argparse type: what mwm accepts as X-Correlation-ID (checked here, before any upload)."""
    if len(text) > 128 or any(not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError("must be printable and at most 128 characters")
    return text


def _client_options(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("MWM_URL", DEFAULT_URL),
        help="mwm's HTTP address (default: $MWM_URL or %(default)s)",
    )
    parser.add_argument("--token", default=os.environ.get("MWM_TOKEN"), help="bearer token (default: $MWM_TOKEN)")
    parser.add_argument(
        "--cacert",
        default=os.environ.get("MWM_CACERT"),
        metavar="FILE",
        help="CA certificate to trust for an https URL (default: $MWM_CACERT)",
    )
    if json_output:
        parser.add_argument("--json", action="store_true", help="print the API's JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mwm", description="Workload manager for medical-imaging AI.")
    parser.add_argument("--version", action="version", version=f"mwm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the service")
    p.add_argument("--config", type=Path, help="TOML configuration file (default: $MWM_CONFIG or built-in defaults)")
    p.add_argument("--log-format", choices=("text", "json"), help="log line format (default: from the config)")
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="the least important lines logged"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("send", help="upload DICOM files or folders to mwm")
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="ID",
        help="send to this application, bypassing discovery (repeatable)",
    )
    p.add_argument("--called-aet", metavar="AET", help="the AE title the instances are sent to")
    p.add_argument("--calling-aet", metavar="AET", help="the AE title they are sent from")
    p.add_argument("--correlation-id", metavar="ID", type=_correlation_id)
    p.add_argument(
        "--concurrency", type=_positive, default=4, metavar="N", help="parallel uploads (default: %(default)s)"
    )
    p.add_argument(
        "--batch", type=_positive, default=8, metavar="N", help="instances per request (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="list every file rejected, failed or skipped in the summary"
    )
    _client_options(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("jobs", help="list, show, cancel or retry jobs")
    p.add_argument("action", nargs="?", choices=("list", "show", "log", "cancel", "retry"), help="list (default)")
    p.add_argument("id", nargs="?", type=int, help="the job's id")
    p.add_argument("--state", choices=JOB_STATES, help="list: only jobs in this state")
    p.add_argument("--app", metavar="ID", help="list: only this application's jobs")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="list: at most N (default: %(default)s)")
    _client_options(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("apps", help="list, show, add, update or delete applications")
    p.add_argument("action", nargs="?", choices=("list", "show", "add", "update", "delete"))
    p.add_argument("id", nargs="?", help="application id (show, delete) or a JSON/TOML file (add, update)")
    _client_options(p)
    p.set_defaults(func=cmd_apps)

    p = sub.add_parser("buckets", help="list open buckets or close one now")
    p.add_argument("action", nargs="?", choices=("list", "close"), help="list (default)")
    p.add_argument("id", nargs="?", type=int, help="the bucket's id (close)")
    p.add_argument("--app", metavar="ID", help="list: only this application's buckets")
    _client_options(p)
    p.set_defaults(func=cmd_buckets)

    p = sub.add_parser("sinks", help="list sinks with their deliveries counted by state")
    _client_options(p)
    p.set_defaults(func=cmd_sinks)

    p = sub.add_parser("deliveries", help="list deliveries or retry a failed one")
    p.add_argument("action", nargs="?", choices=("list", "retry"), help="list (default)")
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="retry: the deliveries' ids (one or more)")
    p.add_argument("--state", choices=DELIVERY_STATES, help="list: only deliveries in this state")
    p.add_argument("--sink", metavar="ID", help="list: only this sink's deliveries")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="list: at most N (default: %(default)s)")
    _client_options(p)
    p.set_defaults(func=cmd_deliveries)

    p = sub.add_parser("results", help="list results, download one, or acknowledge one on a pull sink")
    p.add_argument("action", nargs="?", choices=("list", "get", "ack"), help="list (default), get or ack")
    p.add_argument("id", nargs="?", type=int, help="the result's id (get, ack)")
    p.add_argument("--job", type=int, metavar="ID", help="list: only this job's results")
    p.add_argument(
        "--sink", metavar="ID", help="list: the results waiting on this pull sink; ack: only on this pull sink"
    )
    p.add_argument("--limit", type=_positive, default=100, metavar="N", help="list: at most N (default: %(default)s)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PATH",
        help="get: the file or folder to write, - for standard output (default: its name)",
    )
    p.add_argument("--force", action="store_true", help="get: overwrite an existing file")
    _client_options(p)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("tui", help="the live console: watch and steer a running mwm")
    p.add_argument("--theme", choices=("dark", "light"), help="colour theme (default: the terminal's)")
    _client_options(p, json_output=False)
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("echo", help="send a DICOM C-ECHO and report the round trip")
    p.add_argument("target", metavar="AE@HOST:PORT")
    p.add_argument("--calling-aet", default="MWM-ECHO", metavar="AET", help="our AE title (default: %(default)s)")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per association (default: %(default)s)"
    )
    p.add_argument("--count", type=_positive, default=1, metavar="N", help="echoes to send (default: %(default)s)")
    p.add_argument("--tls", action="store_true", help="over TLS (implied by the options below)")
    p.add_argument("--tls-ca", type=Path, metavar="FILE", help="verify the peer against this CA (default: system CAs)")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="our certificate, for a peer that asks for one")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="the key of --tls-cert")
    p.add_argument("--tls-no-verify", action="store_true", help="do not verify the peer's certificate")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    needs_id = {
        ("buckets", "close"),
        ("apps", "show"),
        ("apps", "delete"),
        ("apps", "add"),
        ("apps", "update"),
        ("jobs", "show"),
        ("jobs", "log"),
        ("jobs", "cancel"),
        ("jobs", "retry"),
    }
    if (args.command, getattr(args, "action", None)) in needs_id and args.id is None:
        what = "a JSON or TOML file is required" if args.action in ("add", "update") else "an id is required"
        print(f"mwm {args.command} {args.action}: {what}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "url", None) is not None:
        try:
            args.url = normalise_url(args.url)
        except ClientError as exc:
            print(f"mwm {args.command}: {_describe(exc)}", file=sys.stderr)
            return EXIT_USAGE
    try:
        result: int = args.func(args)
        return result
    except ClientError as exc:
        print(f"mwm: {_describe(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
