"""Deadlines and back-off as pure functions of stored timestamps (table-tested)."""

from __future__ import annotations


def bucket_deadline(last_arrival: float, timeout: float, opened_at: float, max_age: float) -> float:
    """When a bucket closes: ``timeout`` after its last arrival, but never later than ``max_age`` after it opened."""
    return min(last_arrival + timeout, opened_at + max_age)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (1 for the first retry): ``base * 2**(attempt-1)``, capped."""
    if attempt < 1:
        return 0.0
    # Bound the exponent so a large attempt count cannot overflow a float.
    return float(min(cap, base * (2 ** min(attempt - 1, 62))))


def remaining(deadline: float, now: float) -> float:
    """Seconds until ``deadline``; never negative (a passed deadline is due now)."""
    return max(0.0, deadline - now)
