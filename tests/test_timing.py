"""Deadlines and back-off are pure functions: table-tested."""

from __future__ import annotations

import pytest

from mwm.timing import backoff, bucket_deadline, remaining


@pytest.mark.parametrize(
    ("last_arrival", "timeout", "opened_at", "max_age", "deadline"),
    [
        (100.0, 5.0, 100.0, 3600.0, 105.0),  # first arrival
        (200.0, 5.0, 100.0, 3600.0, 205.0),  # later arrival pushes the deadline back
        (3698.0, 5.0, 100.0, 3600.0, 3700.0),  # capped by the maximum age
        (5000.0, 5.0, 100.0, 3600.0, 3700.0),  # never later than the cap, even long after
        (100.0, 0.0, 100.0, 3600.0, 100.0),  # no timeout: due at once
    ],
)
def test_bucket_deadline(last_arrival, timeout, opened_at, max_age, deadline) -> None:
    assert bucket_deadline(last_arrival, timeout, opened_at, max_age) == deadline


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "delay"),
    [
        (0, 10.0, 600.0, 0.0),
        (1, 10.0, 600.0, 10.0),
        (2, 10.0, 600.0, 20.0),
        (3, 10.0, 600.0, 40.0),
        (7, 10.0, 600.0, 600.0),
        (10_000, 10.0, 600.0, 600.0),
    ],
)
def test_backoff(attempt, base, cap, delay) -> None:
    assert backoff(attempt, base, cap) == delay


def test_remaining_is_never_negative() -> None:
    assert remaining(10.0, 4.0) == 6.0
    assert remaining(10.0, 14.0) == 0.0
