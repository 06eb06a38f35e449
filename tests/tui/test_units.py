"""The console's pure parts, with tables: formatting, back-off, the event-stream parser, the store."""

from __future__ import annotations

from typing import Any

import pytest

from mwm.tui.data import (
    BUCKETS,
    DELIVERIES,
    JOB,
    JOBS,
    LOG,
    SINKS,
    STATS,
    SseEvent,
    SseParser,
    Store,
    Update,
    backoff_delay,
    short_reason,
    topics_for_event,
)
from mwm.tui.fmt import (
    clip,
    delivery_totals,
    fmt_age,
    fmt_bytes,
    fmt_countdown,
    fmt_duration,
    fmt_seconds_setting,
    job_run_seconds,
    light_terminal,
    match_summary,
    parse_ts,
    retry_text,
    uid_tail,
)
from mwm.tui.jobs import job_matches

T0 = parse_ts("2024-05-06T07:08:09.000Z")
assert T0 is not None


@pytest.mark.parametrize(
    ("since", "now", "text"),
    [
        (None, 0.0, "—"),
        (100.0, 100.4, "0s"),
        (100.0, 99.0, "0s"),  # a clock behind the server's never reads as negative
        (0.0, 59.9, "59s"),
        (0.0, 60.0, "1m00s"),
        (0.0, 3599.0, "59m59s"),
        (0.0, 3600.0, "1h00m"),
        (0.0, 3 * 3600 + 30.0, "3h00m"),
        (0.0, 86400.0 + 3 * 3600, "1d03h"),
    ],
)
def test_ages(since: float | None, now: float, text: str) -> None:
    assert fmt_age(since, now) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "—"), (0.05, "<1s"), (1.0, "1s"), (75.0, "1m15s"), (7300.0, "2h01m")]
)
def test_durations(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize(
    ("left", "text"),
    [
        (-1.0, "due"),
        (0.0, "due"),
        (0.2, "00:01"),
        (5.0, "00:05"),
        (299.5, "05:00"),
        (3599.0, "59:59"),
        (3600.0, "1h00m"),
        (25195.0, "6h59m"),
    ],
)
def test_countdowns(left: float, text: str) -> None:
    assert fmt_countdown(1000.0 + left, 1000.0) == text
    assert fmt_countdown(None, 0.0) == "—"


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "—"), (0, "0 B"), (1023, "1023 B"), (13468, "13.2 KiB"), (80 * 2**30, "80.0 GiB"), (3 * 2**40, "3.0 TiB")],
)
def test_sizes(size: int | None, text: str) -> None:
    assert fmt_bytes(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.3, "300ms"), (5.0, "5s"), (1.5, "1.5s"), (120.0, "2m"), (5400.0, "1h30m"), (36000.0, "10h")],
)
def test_configured_durations(seconds: float, text: str) -> None:
    assert fmt_seconds_setting(seconds) == text


def test_small_helpers() -> None:
    assert parse_ts("2024-05-06T07:08:09.500Z") == T0 + 0.5
    assert parse_ts(None) is None and parse_ts("yesterday") is None
    assert uid_tail("1.2.826.0.1.3680043.8.498.12345678901234") == "…5678901234"
    assert uid_tail("1.2.3") == "1.2.3" and uid_tail(None) == "—"
    assert uid_tail("1.2.826.0.1.3680043.8.498.1234567890", 4) == "…7890"
    assert clip("a  b\nc", 10) == "a b c" and clip("abcdef", 4) == "abc…" and clip(None, 3) == "—"
    assert retry_text(104.2, 100.0) == "retrying in 5s" and retry_text(100.0, 100.0) == "retrying now"
    assert light_terminal("0;15") and light_terminal("0;7") and not light_terminal("15;0")
    assert not light_terminal(None) and not light_terminal("default")
    assert delivery_totals({"a": {"delivered": 2, "failed": 1}, "b": {"pending": 3, "failed": 1}}) == {
        "delivered": 2,
        "failed": 2,
        "pending": 3,
    }
    assert match_summary({"called_aet": ["MWM"], "modality": ["CT", "MR"], "body_part": None}) == (
        "called AE MWM · modality CT, MR"
    )
    assert match_summary({"modality": []}) == "everything"
    running = {"started_at": "2024-05-06T07:08:09.000Z", "finished_at": None}
    assert job_run_seconds(running, T0 + 12) == 12
    assert job_run_seconds({**running, "finished_at": "2024-05-06T07:08:10.000Z"}, T0 + 99) == 1
    assert job_run_seconds({"started_at": None}, T0) is None


@pytest.mark.parametrize(
    ("job", "state", "app", "text", "shown"),
    [
        ({"state": "running", "app_id": "a"}, "*", "*", "", True),
        ({"state": "running", "app_id": "a"}, "active", "*", "", True),
        ({"state": "failed", "app_id": "a"}, "active", "*", "", False),
        ({"state": "failed", "app_id": "a"}, "failed", "a", "", True),
        ({"state": "failed", "app_id": "a"}, "*", "b", "", False),
        ({"state": "failed", "patient_id": "SYN00000042"}, "*", "*", "syn000000", True),
        ({"state": "failed", "study_instance_uid": "1.2.3.4567"}, "*", "*", "4567", True),
        ({"state": "failed", "patient_id": "P1"}, "*", "*", "P2", False),
    ],
)
def test_job_filters(job: dict[str, Any], state: str, app: str, text: str, shown: bool) -> None:
    assert job_matches(job, state, app, text) is shown


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (50, 10.0)]
)
def test_back_off(failures: int, delay: float) -> None:
    assert backoff_delay(failures, cap=10.0) == delay


@pytest.mark.parametrize(
    ("kind", "topics"),
    [
        ("bucket.opened", {BUCKETS, STATS}),
        ("job.scheduled", {BUCKETS, JOBS, STATS}),
        ("job.running", {JOBS, STATS}),
        ("job.failed", {JOBS, STATS}),
        ("delivery.failed", {STATS, SINKS, DELIVERIES}),
        ("app.saved", {"apps", STATS}),
        ("retention.results", {STATS}),
    ],
)
def test_what_each_event_makes_stale(kind: str, topics: set[str]) -> None:
    assert topics_for_event(kind) == topics


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        (
            "Cannot connect to host 127.0.0.1:8080 ssl:default [Connect call failed ('127.0.0.1', 8080)]",
            "connection refused",
        ),
        ("Cannot connect to host nowhere:80 ssl:default [Name or service not known]", "unknown host"),
        ("Cannot connect to host h:80 ssl:default [Some new trouble]", "Some new trouble"),
        ("Server disconnected", "connection closed"),
        (None, "no answer"),
    ],
)
def test_short_reasons(detail: str | None, reason: str) -> None:
    assert short_reason(detail) == reason


def test_the_event_stream_parser() -> None:
    parser = SseParser()
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "id: 7",
        "event: job.running",
        'data: {"kind":"job.running",',
        'data: "job_id":3}',
        "",
        "data: no id nor event\r\n",
        "\n",
    ]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [
        SseEvent("7", "job.running", '{"kind":"job.running",\n"job_id":3}'),
        SseEvent("7", "message", "no id nor event"),
    ]
    assert parser.retry_ms == 2000 and parser.last_id == "7"


def test_the_store_takes_what_changed_and_drops_another_jobs_details() -> None:
    store = Store()
    assert store.merge(Update(stats={"instances": 1}, jobs=[])) == {STATS, JOBS}
    assert store.merge(Update(stats={"instances": 1})) == set()
    store.watch(3)
    assert store.merge(Update(job_id=2, job={"id": 2}, log="old")) == set()  # fetched before the move
    assert store.job is None
    assert store.merge(Update(job_id=3, job={"id": 3}, log="x")) == {JOB, LOG}
    assert store.merge(Update(job_id=3, errors={STATS: "boom"})) == set() and store.errors == {STATS: "boom"}
    store.merge(Update(stats={"instances": 2}))
    assert store.errors == {}
